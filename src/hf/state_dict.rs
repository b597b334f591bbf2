//! Our parameters under Hugging Face names and layouts.

use std::collections::HashSet;

use candle_core::{Tensor, Var, backprop::GradStore};

use crate::error::Result;
use crate::model::Gpt;
use crate::model::names::WeightNames;

/// Names of the linear weights a family stores transposed (GPT-2's Conv1D).
fn transposed_names(model: &Gpt) -> HashSet<String> {
    let names = WeightNames::for_config(&model.cfg);
    if !names.conv1d {
        return HashSet::new();
    }
    model
        .linears()
        .into_iter()
        .filter(|l| l.name != model.lm_head.name)
        .map(|l| format!("{}.weight", l.name))
        .collect()
}

fn to_hf_layout(name: &str, t: &Tensor, transposed: &HashSet<String>) -> Result<Tensor> {
    if transposed.contains(name) {
        Ok(t.t()?.contiguous()?)
    } else {
        Ok(t.clone())
    }
}

/// The model's base parameters as a Hugging Face state dict (tied head omitted).
pub fn state_dict(model: &Gpt) -> Result<Vec<(String, Tensor)>> {
    let tr = transposed_names(model);
    model
        .named_parameters()
        .into_iter()
        .map(|(n, t)| {
            let t = to_hf_layout(&n, &t, &tr)?;
            Ok((n, t))
        })
        .collect()
}

/// Gradients of `vars` given in their order (as the training engine returns them,
/// [`crate::model::engine::Grads::take`]), named and in Hugging Face layout.
pub fn named_gradients(
    model: &Gpt,
    vars: &[(String, Var)],
    grads: &[Tensor],
) -> Result<Vec<(String, Tensor)>> {
    let tr = transposed_names(model);
    vars.iter()
        .zip(grads)
        .map(|((n, _), g)| Ok((n.clone(), to_hf_layout(n, g, &tr)?)))
        .collect()
}

/// Gradients of `vars` (named as [`crate::model::TrainableModel::vars`]) in Hugging
/// Face layout. A variable without gradient gets zeros.
pub fn gradients(
    model: &Gpt,
    vars: &[(String, Var)],
    grads: &GradStore,
) -> Result<Vec<(String, Tensor)>> {
    let tr = transposed_names(model);
    vars.iter()
        .map(|(n, v)| {
            let g = match grads.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            Ok((n.clone(), to_hf_layout(n, &g, &tr)?))
        })
        .collect()
}

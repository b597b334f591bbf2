//! Building a [`Gpt`] from named tensors (a checkpoint folder, usually).
//!
//! The family's [`WeightNames`] table says where each tensor lives; every tensor is
//! shape-checked against the config. GPT-2's Conv1D weights `(in, out)` are transposed
//! to `(out, in)` here, once, so the model sees one layout.

use candle_core::{DType, Device, Tensor, Var};

use super::attention::{Attention, QkvProj};
use super::{Block, Gpt, Linear, Mlp, Norm, TrainableModel};
use crate::config::{Config, MlpKind, NormKind, PositionKind, QkvLayout, Residual};
use crate::error::Result;
use crate::model::names::WeightNames;
use crate::model::weights::TensorSource;

/// How to materialise the parameters.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Dtype parameters are stored in.
    pub dtype: DType,
    /// Dtype activations are computed in.
    pub compute_dtype: DType,
    pub device: Device,
    /// Make every base parameter a trainable variable (full fine-tuning).
    pub trainable: bool,
}

impl BuildOptions {
    /// f32 on the CPU, frozen: what parity tests and quick evaluations use.
    pub fn cpu_f32() -> Self {
        BuildOptions {
            dtype: DType::F32,
            compute_dtype: DType::F32,
            device: Device::Cpu,
            trainable: false,
        }
    }
}

struct Loader<'a> {
    src: &'a dyn TensorSource,
    opts: &'a BuildOptions,
    vars: Vec<(String, Var)>,
    /// Every name fetched, to find the tensors of the source nobody asked for.
    used: Vec<String>,
}

impl Loader<'_> {
    /// Fetch `name` with `shape`, transposing a stored `(in, out)` matrix if `transposed`.
    fn param(&mut self, name: String, shape: &[usize], transposed: bool) -> Result<Tensor> {
        let (dtype, dev) = (self.opts.dtype, &self.opts.device);
        self.used.push(name.clone());
        let t = if transposed {
            self.src
                .tensor(&name, &[shape[1], shape[0]], dtype, dev)?
                .t()?
                .contiguous()?
        } else {
            self.src.tensor(&name, shape, dtype, dev)?
        };
        if self.opts.trainable {
            let var = Var::from_tensor(&t)?;
            let t = var.as_tensor().clone();
            self.vars.push((name, var));
            Ok(t)
        } else {
            Ok(t)
        }
    }

    fn linear(
        &mut self,
        module: String,
        n_in: usize,
        n_out: usize,
        bias: bool,
        conv1d: bool,
    ) -> Result<Linear> {
        let w = self.param(format!("{module}.weight"), &[n_out, n_in], conv1d)?;
        let b = if bias {
            Some(self.param(format!("{module}.bias"), &[n_out], false)?)
        } else {
            None
        };
        Ok(Linear::new(module, w, b))
    }

    fn norm(&mut self, module: String, cfg: &Config) -> Result<Norm> {
        let c = cfg.hidden_size;
        let w = self.param(format!("{module}.weight"), &[c], false)?;
        let b = match cfg.norm {
            NormKind::LayerNorm => Some(self.param(format!("{module}.bias"), &[c], false)?),
            NormKind::RmsNorm => None,
        };
        Ok(Norm::new(module, cfg.norm, w, b, cfg.norm_eps))
    }
}

/// A tied model that stores its head anyway must store a copy of the embeddings:
/// config.json saying `tie_word_embeddings` over a head of its own would score with
/// the embeddings and drop the trained head in silence.
fn check_tied_head(src: &dyn TensorSource, names: &WeightNames, wte: &Tensor) -> Result<()> {
    let head = format!("{}.weight", names.lm_head);
    if !src.contains(&head) {
        return Ok(());
    }
    let stored = src.tensor(&head, wte.dims(), DType::F32, wte.device())?;
    let wte = wte.to_dtype(DType::F32)?;
    let max_abs = |t: &Tensor| t.abs()?.max_all()?.to_scalar::<f32>();
    let diff = max_abs(&(stored - &wte)?)?;
    let same = diff <= 1e-5 * max_abs(&wte)?; // false for NaN too
    if !same {
        return Err(crate::Error::Weights(format!(
            "config.json sets tie_word_embeddings, but the checkpoint's {head} differs from the embeddings {}.weight (by up to {diff}); set tie_word_embeddings to false to use it",
            names.embed
        )));
    }
    Ok(())
}

/// Build the decoder of `cfg` from `src`.
pub fn build_model(
    cfg: &Config,
    src: &dyn TensorSource,
    opts: &BuildOptions,
) -> Result<TrainableModel> {
    build_model_by_block(cfg, src, opts, None)
}

/// What [`build_model_by_block`] does with each block as soon as it is built: given the
/// block and its trainable variables, returns what the model keeps of it.
pub type OnBlock<'a> = &'a mut dyn FnMut(Block, Vec<(String, Var)>) -> Result<Block>;

/// [`build_model`], handing each block to `on_block` as soon as it is built (`--strategy
/// fsdp` keeps only its shard): the model holds what it returns, and the returned
/// variables are those outside the blocks.
pub fn build_model_by_block(
    cfg: &Config,
    src: &dyn TensorSource,
    opts: &BuildOptions,
    mut on_block: Option<OnBlock>,
) -> Result<TrainableModel> {
    let names = WeightNames::for_config(cfg);
    let mut ld = Loader {
        src,
        opts,
        vars: Vec::new(),
        used: Vec::new(),
    };
    let c = cfg.hidden_size;
    let conv = names.conv1d;
    let wte = ld.param(
        format!("{}.weight", names.embed),
        &[cfg.vocab_size, c],
        false,
    )?;
    let wpe = match (&cfg.position, names.pos_embed) {
        (PositionKind::Learned, Some(n)) => Some((
            n.to_string(),
            ld.param(format!("{n}.weight"), &[cfg.block_size, c], false)?,
        )),
        _ => None,
    };
    let q_width = cfg.n_head * cfg.head_dim;
    let kv_width = cfg.n_kv_head * cfg.head_dim;
    let mut blocks = Vec::with_capacity(cfg.n_layer);
    for i in 0..cfg.n_layer {
        let block_vars_from = ld.vars.len();
        let at = |m: &str| names.in_layer(i, m);
        let norm1 = ld.norm(at(names.attn_norm), cfg)?;
        let shared = cfg.residual == Residual::Parallel && cfg.shared_attention_norm;
        let norm2 = match (shared, names.mlp_norm) {
            (false, Some(n)) => Some(ld.norm(at(n), cfg)?),
            _ => None,
        };
        let qkv = match cfg.qkv_layout {
            QkvLayout::Separate => QkvProj::Separate {
                q: ld.linear(at(names.q), c, q_width, cfg.qkv_bias, conv)?,
                k: ld.linear(at(names.k), c, kv_width, cfg.qkv_bias, conv)?,
                v: ld.linear(at(names.v), c, kv_width, cfg.qkv_bias, conv)?,
            },
            QkvLayout::FusedBlocked => QkvProj::Blocked(ld.linear(
                at(names.qkv),
                c,
                cfg.qkv_width(),
                cfg.qkv_bias,
                conv,
            )?),
            QkvLayout::FusedGrouped => QkvProj::Grouped(ld.linear(
                at(names.qkv),
                c,
                cfg.qkv_width(),
                cfg.qkv_bias,
                conv,
            )?),
        };
        let proj = ld.linear(at(names.attn_out), q_width, c, cfg.attn_out_bias, conv)?;
        let f = cfg.intermediate_size;
        let gate = match cfg.mlp {
            MlpKind::Gated => Some(ld.linear(at(names.mlp_gate), c, f, cfg.mlp_bias, conv)?),
            MlpKind::Plain => None,
        };
        let up = ld.linear(at(names.mlp_up), c, f, cfg.mlp_bias, conv)?;
        let down = ld.linear(at(names.mlp_down), f, c, cfg.mlp_bias, conv)?;
        let block = Block {
            norm1,
            norm2,
            attn: Attention::new(cfg, i, qkv, proj),
            mlp: Mlp {
                up,
                gate,
                down,
                activation: cfg.activation,
            },
            residual: cfg.residual,
        };
        blocks.push(match on_block.as_mut() {
            Some(f) => {
                let vars = ld.vars.split_off(block_vars_from);
                f(block, vars)?
            }
            None => block,
        });
    }
    let ln_f = ld.norm(names.final_norm.to_string(), cfg)?;
    if cfg.tie_embeddings {
        check_tied_head(src, &names, &wte)?;
    }
    let lm_head = if cfg.tie_embeddings {
        Linear::new(names.lm_head.to_string(), wte.clone(), None)
    } else {
        let stored = match names.lm_head_alias {
            Some(alias) if !src.contains(&format!("{}.weight", names.lm_head)) => alias,
            _ => names.lm_head,
        };
        let mut head = ld.linear(stored.to_string(), c, cfg.vocab_size, false, false)?;
        if stored != names.lm_head {
            // Keep our one name for it; the variable too.
            head.name = names.lm_head.to_string();
            if let Some((n, _)) = ld.vars.last_mut() {
                *n = format!("{}.weight", names.lm_head);
            }
        }
        head
    };
    src.check_all_used(&ld.used, cfg.tie_embeddings)?;
    let model = Gpt {
        cfg: cfg.clone(),
        wte,
        wte_name: names.embed.to_string(),
        wpe,
        blocks,
        ln_f,
        lm_head,
        compute_dtype: opts.compute_dtype,
        trained_embeddings: None,
    };
    Ok(TrainableModel {
        model,
        vars: ld.vars,
    })
}

//! The `README.md` model card of a converted checkpoint: Hub front matter (licence,
//! base model, tags), then what was trained on what, for how long, with which
//! losses, and how to load it.

use std::fmt::Write as _;
use std::path::Path;

use candle_core::DType;
use serde_json::Value;

use super::peft::PeftAdapter;
use crate::config::Family;

/// What the card is written from.
#[derive(Debug)]
pub struct CardInfo<'a> {
    pub family: Family,
    /// The base model folder (`checkpoints/ORG/NAME` names the Hub repo `ORG/NAME`).
    pub base: Option<&'a Path>,
    pub training_state: Option<&'a Value>,
    pub adapter: Option<&'a PeftAdapter>,
    pub license: Option<&'a str>,
    pub repo_id: Option<&'a str>,
    pub dtype: DType,
    pub out: &'a Path,
}

/// The `license:` of a model folder's README front matter.
pub fn license_of(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("README.md")).ok()?;
    let body = text.strip_prefix("---")?;
    let end = body.find("\n---")?;
    body[..end].lines().find_map(|l| {
        l.strip_prefix("license:")
            .map(|v| v.trim().trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    })
}

/// A Hub id for a base folder: `ORG/NAME` when it sits at `.../checkpoints/ORG/NAME`
/// (where `lit-claire download` puts it), else its folder name.
pub fn base_model_id(base: &Path) -> String {
    let parts: Vec<String> = base
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let n = parts.len();
    if n >= 3 && parts[n - 3] == "checkpoints" {
        return format!("{}/{}", parts[n - 2], parts[n - 1]);
    }
    parts.last().cloned().unwrap_or_else(|| "unknown".into())
}

fn number(state: Option<&Value>, key: &str) -> Option<String> {
    let v = state?.get(key)?;
    match v {
        Value::Number(n) => Some(match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.4}"),
            _ => n.to_string(),
        }),
        _ => None,
    }
}

/// The card's Markdown.
pub fn model_card(info: &CardInfo) -> String {
    let base_id = info.base.map(base_model_id);
    let license = info.license.unwrap_or("other");
    let state = info.training_state;
    let hp = state.and_then(|s| s.get("hyperparameters"));
    let data = hp
        .and_then(|h| h.get("data_dir"))
        .and_then(Value::as_str)
        .map(String::from);
    let mut s = String::new();
    s.push_str("---\n");
    let _ = writeln!(s, "license: {license}");
    s.push_str("library_name: transformers\npipeline_tag: text-generation\n");
    if let Some(b) = &base_id {
        let _ = writeln!(s, "base_model: {b}");
    }
    s.push_str("tags:\n- lit-claire\n- continual-pretraining\n");
    if info.adapter.is_some() {
        s.push_str("- lora\n");
    }
    s.push_str("---\n\n");

    let title = info
        .repo_id
        .map(String::from)
        .or_else(|| {
            info.out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into());
    let _ = writeln!(s, "# {title}\n");
    let method = if info.adapter.is_some() {
        "LoRA (adapter merged into the base weights)"
    } else {
        "full fine-tuning"
    };
    let _ = writeln!(
        s,
        "A {} model continually pretrained with lit-claire by {method}.\n",
        info.family.model_type()
    );
    s.push_str("## Training\n\n| | |\n|---|---|\n");
    let row = |s: &mut String, k: &str, v: Option<String>| {
        let _ = writeln!(
            s,
            "| {k} | {} |",
            v.unwrap_or_else(|| "not recorded".into())
        );
    };
    row(&mut s, "Base model", base_id.clone());
    row(&mut s, "Data", data);
    row(&mut s, "Method", Some(method.into()));
    if let Some(a) = info.adapter {
        row(
            &mut s,
            "LoRA",
            Some(format!(
                "r = {}, alpha = {}, modules: {}",
                a.r,
                a.alpha,
                a.target_modules.join(", ")
            )),
        );
    }
    row(&mut s, "Optimizer steps", number(state, "step"));
    row(&mut s, "Tokens seen", number(state, "tokens"));
    row(&mut s, "Final training loss", number(state, "train_loss"));
    row(&mut s, "Final validation loss", number(state, "val_loss"));
    if let Some(lr) = hp.and_then(|h| h.get("learning_rate")) {
        row(&mut s, "Learning rate", Some(lr.to_string()));
    }
    row(
        &mut s,
        "Weights dtype",
        Some(crate::config::torch_dtype_name(info.dtype).into()),
    );
    row(&mut s, "Licence", Some(license.into()));

    let path = info
        .repo_id
        .map(String::from)
        .unwrap_or_else(|| info.out.display().to_string());
    let _ = write!(
        s,
        "\n## How to load\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         tokenizer = AutoTokenizer.from_pretrained(\"{path}\")\n\
         model = AutoModelForCausalLM.from_pretrained(\"{path}\", dtype=\"auto\")\n\
         inputs = tokenizer(\"Bonjour, \", return_tensors=\"pt\")\n\
         print(tokenizer.decode(model.generate(**inputs, max_new_tokens=40)[0]))\n```\n\n\
         With lit-claire:\n\n```sh\nlit-claire generate --checkpoint-dir {local} --prompt \"Bonjour, \"\n```\n",
        local = info.out.display()
    );
    s.push_str(
        "\n## Licence\n\nThe weights are a derivative of the base model and are released under its licence",
    );
    let _ = writeln!(
        s,
        " (`{license}`); check the base model's terms before use."
    );
    s
}

//! Networks as data: model files (docs/models.md), the presets embedded in the binary (the
//! files of `models/`), and the builder that turns a file into layers.
//!
//! - [`spec`]: the file format, parsed into a [`ModelSpec`] with errors that name the place.
//! - [`build`](mod@build): shapes inferred from the input, weights initialized, a summary row per module.

pub mod build;
pub mod norm;
pub mod spec;

pub use build::{build, fill_normal, fill_uniform, resolve_input, Built, SummaryRow};
pub use norm::{apply_norm, NormChoice};
pub use spec::{
    BiasInit, Child, Init, InitSpec, ModelSpec, Node, RenormSpec, WeightInit, LAYER_KINDS,
};

use crate::{Error, Result};
use std::path::Path;

/// The presets: name and model file, as kept readable in `models/`.
pub const PRESETS: &[(&str, &str)] = &[
    ("mlp-fig1", include_str!("../../models/mlp-fig1.json")),
    ("mlp-fig1-bn", include_str!("../../models/mlp-fig1-bn.json")),
    (
        "inception-mini",
        include_str!("../../models/inception-mini.json"),
    ),
    (
        "inception-mini-bn",
        include_str!("../../models/inception-mini-bn.json"),
    ),
    (
        "inception-mini-bn-sigmoid",
        include_str!("../../models/inception-mini-bn-sigmoid.json"),
    ),
    (
        "inception-mini-sigmoid",
        include_str!("../../models/inception-mini-sigmoid.json"),
    ),
    (
        "inception-mini-bn-dropout",
        include_str!("../../models/inception-mini-bn-dropout.json"),
    ),
    ("resnet20-bn", include_str!("../../models/resnet20-bn.json")),
    ("resnet20", include_str!("../../models/resnet20.json")),
    ("vgg-mini-bn", include_str!("../../models/vgg-mini-bn.json")),
    ("vgg-mini", include_str!("../../models/vgg-mini.json")),
];

/// The preset names, in `bnlab models` order.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}

/// A preset's model file text.
pub fn preset_text(name: &str) -> Option<&'static str> {
    PRESETS.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// A preset by name.
pub fn preset(name: &str) -> Result<ModelSpec> {
    let text = preset_text(name).ok_or_else(|| unknown(name))?;
    let mut spec = ModelSpec::parse(text, name)?;
    spec.name = name.to_string();
    Ok(spec)
}

fn unknown(name: &str) -> Error {
    Error::config(
        "--model",
        format!(
            "'{name}' is neither a preset ({}) nor a model file",
            preset_names().join(", ")
        ),
    )
}

/// `--model`'s value: a preset name or the path of a model file. A file without a `name`
/// takes its file stem as name.
pub fn resolve(name_or_path: &str) -> Result<ModelSpec> {
    if preset_text(name_or_path).is_some() {
        return preset(name_or_path);
    }
    let path = Path::new(name_or_path);
    if !path.exists() {
        return Err(unknown(name_or_path));
    }
    if path.is_dir() {
        return Err(Error::config(
            "--model",
            format!("{} is a directory, not a model file", path.display()),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut spec = ModelSpec::parse(&text, &path.display().to_string())?;
    if spec.name.is_empty() {
        spec.name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
    }
    Ok(spec)
}

//! Checkpoints as safetensors files with PyTorch's `state_dict` names, float32 tensors and
//! `num_batches_tracked` as I64, so that `model.load_state_dict(safetensors.torch.load_file(p))`
//! loads ours and we load PyTorch's. Writes are atomic: a temporary file, then a rename.

use crate::network::Network;
use crate::nn::TensorMut;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A tensor read from a safetensors file, converted to f64 or i64 for checking.
#[derive(Clone, Debug)]
pub enum Loaded {
    /// 32-bit floats (weights, BN statistics).
    F32(Vec<f32>),
    /// 64-bit floats.
    F64(Vec<f64>),
    /// 64-bit integers (`num_batches_tracked`).
    I64(Vec<i64>),
}

/// Every tensor of a safetensors file with its dtype and shape, plus the metadata map.
pub struct TensorFile {
    /// Each tensor by name: its shape and values.
    pub tensors: BTreeMap<String, (Vec<usize>, Loaded)>,
    /// The file's `__metadata__` (bnlab records the model file and input shape there).
    pub metadata: HashMap<String, String>,
}

impl TensorFile {
    /// Read and parse a safetensors file; an error names the file and what is wrong with it
    /// (not safetensors, an unsupported dtype, a length that does not match the shape).
    pub fn read(path: &Path) -> Result<TensorFile> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |msg: String| Error::checkpoint(path, msg);
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let loaded = decode(&view).map_err(|m| bad(format!("tensor '{name}': {m}")))?;
            tensors.insert(name, (view.shape().to_vec(), loaded));
        }
        Ok(TensorFile {
            tensors,
            metadata: meta.metadata().clone().unwrap_or_default(),
        })
    }

    /// A float tensor as f64 (from F32 or F64).
    pub fn f64s(&self, name: &str) -> Option<Vec<f64>> {
        match self.tensors.get(name)? {
            (_, Loaded::F32(v)) => Some(v.iter().map(|&x| x as f64).collect()),
            (_, Loaded::F64(v)) => Some(v.clone()),
            (_, Loaded::I64(_)) => None,
        }
    }

    /// A float tensor as f32 (from F32 only).
    pub fn f32s(&self, name: &str) -> Option<Vec<f32>> {
        match self.tensors.get(name)? {
            (_, Loaded::F32(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// The shape of tensor `name`, if the file holds it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }
}

fn decode(view: &TensorView<'_>) -> std::result::Result<Loaded, String> {
    let data = view.data();
    let count: usize = view.shape().iter().product();
    let check = |size: usize| {
        if data.len() != count * size {
            Err(format!(
                "{} bytes of data for {} elements",
                data.len(),
                count
            ))
        } else {
            Ok(())
        }
    };
    Ok(match view.dtype() {
        Dtype::F32 => {
            check(4)?;
            Loaded::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            )
        }
        Dtype::F64 => {
            check(8)?;
            Loaded::F64(
                data.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        Dtype::I64 => {
            check(8)?;
            Loaded::I64(
                data.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        other => return Err(format!("unsupported dtype {other:?}")),
    })
}

pub use crate::fsutil::write_atomic;

/// One tensor ready to be written: name, dtype, shape, little-endian bytes.
pub type Entry = (String, Dtype, Vec<usize>, Vec<u8>);

/// The network's `state_dict` as entries, in PyTorch's layouts.
pub fn state_entries(net: &mut Network) -> Vec<Entry> {
    let mut owned: Vec<Entry> = Vec::new();
    net.visit_state(&mut |name, shape, t| {
        let (dtype, bytes) = match t {
            TensorMut::F32(v) => (Dtype::F32, f32_bytes(v)),
            TensorMut::F32T(v) => (Dtype::F32, f32_bytes(&transpose(v, shape[1], shape[0]))),
            TensorMut::I64(v) => (Dtype::I64, v.to_le_bytes().to_vec()),
        };
        owned.push((name.to_string(), dtype, shape.to_vec(), bytes));
    });
    owned
}

/// The little-endian bytes of `v`, as safetensors stores F32 tensors.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Write entries and metadata as one safetensors file, atomically.
pub fn write_entries(path: &Path, entries: &[Entry], meta: HashMap<String, String>) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = entries
        .iter()
        .map(|(n, d, s, b)| {
            TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::checkpoint(path, format!("cannot encode '{n}': {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::checkpoint(path, format!("cannot encode: {e}")))?;
    let bytes = canonical_header(bytes)
        .ok_or_else(|| Error::checkpoint(path, "cannot encode the header".to_string()))?;
    write_atomic(path, &bytes)
}

/// The metadata every checkpoint of `net` carries: PyTorch's `format`, the model's name, the
/// shape of one example, and the model file itself (so that the checkpoint says what it is).
pub fn model_metadata(net: &Network) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("bnlab_model".to_string(), net.name().to_string());
    meta.insert(
        INPUT_SHAPE_KEY.to_string(),
        serde_json::to_string(&net.input_shape).unwrap_or_default(),
    );
    meta.insert(MODEL_SPEC_KEY.to_string(), net.spec.to_json().to_string());
    if let Some(b) = net.train_batch_size {
        meta.insert(BATCH_SIZE_KEY.to_string(), b.to_string());
    }
    if let Some(n) = &net.normalization {
        meta.insert(
            NORMALIZE_KEY.to_string(),
            serde_json::to_string(n).unwrap_or_default(),
        );
    }
    meta
}

/// Metadata key of the mini-batch size a network was trained with.
pub const BATCH_SIZE_KEY: &str = "bnlab_batch_size";

/// Metadata key of the input normalization (`{"mean": [..], "std": [..]}`) a network was
/// trained with; absent when none.
pub const NORMALIZE_KEY: &str = "bnlab_normalize";

/// Metadata key of the shape of one example (`[1, 28, 28]`).
pub const INPUT_SHAPE_KEY: &str = "bnlab_input_shape";
/// Metadata key of the model file (JSON) a checkpoint was saved from.
pub const MODEL_SPEC_KEY: &str = "bnlab_model_spec";

/// The input shape a checkpoint records, if any.
pub fn recorded_input_shape(file: &TensorFile) -> Option<Vec<usize>> {
    serde_json::from_str(file.metadata.get(INPUT_SHAPE_KEY)?).ok()
}

/// The same safetensors file with its JSON header's keys in sorted order (the metadata is a
/// hash map, whose order varies from one write to the next), so that identical runs write
/// identical bytes. Tensor offsets are relative to the data section, which does not move
/// relative to the header's end; the header is padded with spaces to a multiple of 8 bytes,
/// as safetensors does.
fn canonical_header(bytes: Vec<u8>) -> Option<Vec<u8>> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8 + n)?;
    let value: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut text = serde_json::to_vec(&sorted(value)).ok()?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    Some(out)
}

/// `v` with every object's keys inserted in sorted order (whatever map serde_json uses).
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<(String, serde_json::Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        other => other,
    }
}

/// Save the network's `state_dict` to `path`.
pub fn save(net: &mut Network, path: &Path) -> Result<()> {
    let entries = state_entries(net);
    write_entries(path, &entries, model_metadata(net))
}

/// Load a `state_dict` into the network. Every expected tensor must be present with the right
/// shape and dtype and finite values, and no other tensor may be present: a checkpoint of
/// another model is refused, with the first difference named.
pub fn load(net: &mut Network, path: &Path) -> Result<()> {
    let file = TensorFile::read(path)?;
    load_from(net, &file, path, None)
}

/// `load` from a file already read; tensors whose names start with `ignore_prefix` (extra
/// state of a run checkpoint) are not counted as belonging to another model.
pub fn load_from(
    net: &mut Network,
    file: &TensorFile,
    path: &Path,
    ignore_prefix: Option<&str>,
) -> Result<()> {
    let model = net.name().to_string();
    let bad = |msg: String| Error::checkpoint(path, format!("{msg} (loading into {model})"));
    if let Some(theirs) = file.metadata.get("bnlab_model") {
        if *theirs != model {
            return Err(Error::checkpoint(
                path,
                format!("this checkpoint is for {theirs}, not {model}"),
            ));
        }
    }
    net.train_batch_size = match file.metadata.get(BATCH_SIZE_KEY) {
        None => None,
        Some(t) => Some(
            t.parse::<usize>()
                .ok()
                .filter(|&b| b >= 1)
                .ok_or_else(|| bad(format!("bad training batch size '{t}' in the metadata")))?,
        ),
    };
    // The input normalization travels with the weights.
    net.normalization = match file.metadata.get(NORMALIZE_KEY) {
        None => None,
        Some(text) => {
            let n: crate::data::Normalization = serde_json::from_str(text)
                .map_err(|e| bad(format!("unreadable input normalization: {e}")))?;
            n.validate()
                .map_err(|e| bad(format!("input normalization: {e}")))?;
            Some(n)
        }
    };
    let mut expected = Vec::new();
    let mut err: Option<Error> = None;
    net.visit_state(&mut |name, shape, t| {
        expected.push(name.to_string());
        if err.is_some() {
            return;
        }
        let Some((got_shape, data)) = file.tensors.get(name) else {
            err = Some(bad(format!("missing tensor '{name}'")));
            return;
        };
        if got_shape.as_slice() != shape {
            err = Some(bad(format!(
                "tensor '{name}' has shape {got_shape:?}, expected {shape:?}"
            )));
            return;
        }
        match (t, data) {
            (TensorMut::F32(dst) | TensorMut::F32T(dst), Loaded::F32(src))
                if src.iter().any(|v| !v.is_finite()) =>
            {
                let _ = dst;
                let i = src.iter().position(|v| !v.is_finite()).unwrap_or(0);
                err = Some(bad(format!(
                    "tensor '{name}' holds a non-finite value ({}) at index {i}",
                    src[i]
                )));
            }
            (TensorMut::F32(dst), Loaded::F32(src)) => dst.copy_from_slice(src),
            (TensorMut::F32T(dst), Loaded::F32(src)) => {
                dst.copy_from_slice(&transpose(src, shape[0], shape[1]))
            }
            (TensorMut::I64(dst), Loaded::I64(src)) => {
                *dst = src.first().copied().unwrap_or(0);
            }
            (TensorMut::F32(_) | TensorMut::F32T(_), _) => {
                err = Some(bad(format!("tensor '{name}' must be F32")));
            }
            (TensorMut::I64(_), _) => {
                err = Some(bad(format!("tensor '{name}' must be I64")));
            }
        }
    });
    if let Some(e) = err {
        // Name a stranger too: a missing tensor beside unknown ones means another model.
        let stranger = file
            .tensors
            .keys()
            .find(|k| !expected.contains(k) && !ignore_prefix.is_some_and(|p| k.starts_with(p)));
        return Err(match (e, stranger) {
            (Error::Checkpoint { path, msg }, Some(x)) if msg.starts_with("missing") => {
                Error::Checkpoint {
                    path,
                    msg: format!("{msg}; it holds '{x}' instead: a checkpoint of another model"),
                }
            }
            (e, _) => e,
        });
    }
    let foreign =
        |k: &&String| !expected.contains(k) && !ignore_prefix.is_some_and(|p| k.starts_with(p));
    if let Some(extra) = file.tensors.keys().find(foreign) {
        return Err(bad(format!(
            "unexpected tensor '{extra}': this checkpoint belongs to another model"
        )));
    }
    Ok(())
}

/// The transpose of a row-major `rows x cols` matrix.
fn transpose(v: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

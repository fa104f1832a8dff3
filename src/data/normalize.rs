//! Per-channel input normalization: `x' = (x - mean[c]) / std[c]`, applied to the pixels after
//! their conversion to `f32` (bytes / 255, floats as stored), as torchvision's
//! `Normalize(mean, std)` after `ToTensor()`.
//!
//! - [`parse_normalize_flag`] reads the command-line value: `none`, `auto` (statistics of the
//!   training set, [`channel_stats`]), or explicit pairs `MEAN,STD[;MEAN,STD...]`, one pair per
//!   channel or a single pair for all channels (`0.1307,0.3081` for MNIST).
//! - [`channel_stats`] computes each channel's mean and population standard deviation over a
//!   whole data set in `f64`.
//! - [`super::Dataset::set_normalization`] validates a [`Normalization`] against the data and
//!   applies it in every batch from then on.
//!
//! A [`Normalization`] is (de)serializable with serde (`{"mean": [...], "std": [...]}`), so
//! checkpoints can record the one a network was trained with; evaluation must use the same one.

use serde::{Deserialize, Serialize};

use super::dataset::{Dataset, Pixels};
use crate::error::{Error, Result};

/// The flag name used in [`parse_normalize_flag`]'s error messages.
pub const NORMALIZE_FLAG: &str = "--normalize";

/// Per-channel means and standard deviations: channel `c` becomes `(x - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Subtracted from each channel's values.
    pub mean: Vec<f32>,
    /// Each channel's values are divided by it (after the subtraction); finite and above zero.
    pub std: Vec<f32>,
}

impl Normalization {
    /// A normalization with one (mean, std) pair per channel, validated as
    /// [`Normalization::validate`] does.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Normalization> {
        let n = Normalization { mean, std };
        n.validate()?;
        Ok(n)
    }

    /// The same (mean, std) for every channel.
    pub fn uniform(mean: f32, std: f32) -> Result<Normalization> {
        Normalization::new(vec![mean], vec![std])
    }

    /// Number of (mean, std) pairs.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Checks that there is at least one pair, as many means as stds, every mean finite and
    /// every std finite and above zero.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::config("normalization", msg));
        if self.mean.is_empty() {
            return bad("no (mean, std) pair".into());
        }
        if self.mean.len() != self.std.len() {
            return bad(format!(
                "{} means but {} standard deviations",
                self.mean.len(),
                self.std.len()
            ));
        }
        if let Some((c, m)) = self.mean.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return bad(format!("mean of channel {c} is {m}, not a finite number"));
        }
        if let Some((c, s)) = self
            .std
            .iter()
            .enumerate()
            .find(|(_, s)| !(s.is_finite() && **s > 0.0))
        {
            return bad(format!(
                "standard deviation of channel {c} is {s}; it must be finite and above zero \
                 (a channel whose values are all equal cannot be normalized)"
            ));
        }
        Ok(())
    }

    /// This normalization for images of `channels` channels: validated, and a single pair
    /// repeated for every channel; an error if there are several pairs but not `channels`.
    pub fn for_channels(&self, channels: usize) -> Result<Normalization> {
        self.validate()?;
        match self.mean.len() {
            n if n == channels => Ok(self.clone()),
            1 => Ok(Normalization {
                mean: vec![self.mean[0]; channels],
                std: vec![self.std[0]; channels],
            }),
            n => Err(Error::config(
                "normalization",
                format!(
                    "{n} (mean, std) pairs for images of {channels} channel(s); give one pair per \
                     channel or a single pair for all"
                ),
            )),
        }
    }

    /// `(x - mean[c]) / std[c]`, the value channel `c`'s `x` becomes.
    ///
    /// # Panics
    /// If `c` is not below [`Normalization::channels`].
    pub fn apply(&self, c: usize, x: f32) -> f32 {
        (x - self.mean[c]) / self.std[c]
    }

    /// What a pixel of value 0 becomes in each channel, `-mean[c] / std[c]`: the fill that
    /// makes zero padding after normalization equal zero padding before it (see
    /// [`super::CropFlip::with_fill`]).
    pub fn normalized_zero(&self) -> Vec<f32> {
        (0..self.channels()).map(|c| self.apply(c, 0.0)).collect()
    }

    /// Parses explicit pairs `MEAN,STD[;MEAN,STD...]` (spaces allowed), validated.
    pub fn parse(s: &str) -> Result<Normalization> {
        let bad = |msg: String| Error::config(NORMALIZE_FLAG, format!("'{s}': {msg}"));
        let (mut mean, mut std) = (Vec::new(), Vec::new());
        for (k, pair) in s.split(';').enumerate() {
            let parts: Vec<&str> = pair.split(',').map(str::trim).collect();
            let [m, d] = parts[..] else {
                return Err(bad(format!(
                    "pair {} ('{}') is not MEAN,STD; expected none, auto, or \
                     MEAN,STD[;MEAN,STD...] (one pair per channel, or one for all)",
                    k + 1,
                    pair.trim()
                )));
            };
            let num = |v: &str, what: &str| {
                v.parse::<f32>()
                    .map_err(|_| bad(format!("{what} '{v}' of pair {} is not a number", k + 1)))
            };
            mean.push(num(m, "mean")?);
            std.push(num(d, "standard deviation")?);
        }
        Normalization::new(mean, std).map_err(|e| match e {
            Error::Config { msg, .. } => bad(msg),
            other => other,
        })
    }
}

/// Formats as `MEAN,STD;MEAN,STD...`, which [`Normalization::parse`] reads back to the same
/// values (Rust prints the shortest decimal that round-trips).
impl std::fmt::Display for Normalization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (c, (m, s)) in self.mean.iter().zip(&self.std).enumerate() {
            if c > 0 {
                f.write_str(";")?;
            }
            write!(f, "{m},{s}")?;
        }
        Ok(())
    }
}

/// The value of the `--normalize` flag, before the data set is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalizeFlag {
    /// No normalization: batches hold the converted pixels (bytes / 255 or the stored floats).
    None,
    /// Each channel's mean and population standard deviation over the training set
    /// ([`channel_stats`]).
    Auto,
    /// The given pairs.
    Fixed(Normalization),
}

/// Parses the `--normalize` value: `none`, `auto`, or `MEAN,STD[;MEAN,STD...]` (one pair per
/// channel or one pair for all; every std finite and above zero). Errors are
/// [`Error::Config`] naming `--normalize`.
pub fn parse_normalize_flag(s: &str) -> Result<NormalizeFlag> {
    match s.trim() {
        "none" => Ok(NormalizeFlag::None),
        "auto" => Ok(NormalizeFlag::Auto),
        other => Normalization::parse(other).map(NormalizeFlag::Fixed),
    }
}

impl NormalizeFlag {
    /// The normalization to set on the data: `None`, the training set's [`channel_stats`], or
    /// the given pairs (not yet checked against the channel count:
    /// [`super::Split::set_normalization`] does that).
    pub fn resolve(&self, train: &Dataset) -> Option<Normalization> {
        match self {
            NormalizeFlag::None => None,
            NormalizeFlag::Auto => Some(channel_stats(train)),
            NormalizeFlag::Fixed(n) => Some(n.clone()),
        }
    }
}

/// Each channel's mean and population standard deviation (divisor N) over every pixel of every
/// image of `data`, of the values batches hold before normalization (the `f32` value
/// `b as f32 / 255.0` of each byte, or the stored float), accumulated in `f64` in two passes and
/// rounded to `f32`. Any normalization already set on `data` is ignored. A channel whose values
/// are all equal gets std 0, which [`super::Dataset::set_normalization`] refuses; an empty data
/// set gets mean 0 and std 0.
pub fn channel_stats(data: &Dataset) -> Normalization {
    let (c, plane, n) = (data.channels, data.rows * data.cols, data.len());
    let count = (n * plane) as f64;
    let mut mean = vec![0f32; c];
    let mut std = vec![0f32; c];
    if n == 0 || plane == 0 {
        return Normalization { mean, std };
    }
    match &data.images {
        Pixels::U8(bytes) => {
            // A histogram per channel makes both passes exact and cheap.
            let mut hist = vec![[0u64; 256]; c];
            for img in bytes.chunks_exact(c * plane) {
                for (h, ch) in hist.iter_mut().zip(img.chunks_exact(plane)) {
                    for &b in ch {
                        h[b as usize] += 1;
                    }
                }
            }
            for (k, h) in hist.iter().enumerate() {
                let value = |b: usize| (b as f32 / 255.0) as f64;
                let m = (0..256).map(|b| h[b] as f64 * value(b)).sum::<f64>() / count;
                let var = (0..256)
                    .map(|b| h[b] as f64 * (value(b) - m).powi(2))
                    .sum::<f64>()
                    / count;
                mean[k] = m as f32;
                std[k] = var.sqrt() as f32;
            }
        }
        Pixels::F32(values) => {
            let mut sums = vec![0f64; c];
            for img in values.chunks_exact(c * plane) {
                for (s, ch) in sums.iter_mut().zip(img.chunks_exact(plane)) {
                    *s += ch.iter().map(|&v| v as f64).sum::<f64>();
                }
            }
            let means: Vec<f64> = sums.iter().map(|s| s / count).collect();
            let mut sq = vec![0f64; c];
            for img in values.chunks_exact(c * plane) {
                for ((s, ch), &m) in sq.iter_mut().zip(img.chunks_exact(plane)).zip(&means) {
                    *s += ch.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>();
                }
            }
            for k in 0..c {
                mean[k] = means[k] as f32;
                std[k] = (sq[k] / count).sqrt() as f32;
            }
        }
    }
    Normalization { mean, std }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_forms() {
        assert_eq!(parse_normalize_flag("none").unwrap(), NormalizeFlag::None);
        assert_eq!(parse_normalize_flag(" auto ").unwrap(), NormalizeFlag::Auto);
        let n = Normalization::parse("0.1307,0.3081").unwrap();
        assert_eq!((n.mean, n.std), (vec![0.1307], vec![0.3081]));
        let n = Normalization::parse("0.49, 0.25; 0.48,0.24 ;0.45,0.26").unwrap();
        assert_eq!(n.mean, vec![0.49, 0.48, 0.45]);
        assert_eq!(n.std, vec![0.25, 0.24, 0.26]);
        assert_eq!(Normalization::parse(&n.to_string()).unwrap(), n);
        for bad in [
            "",
            "0.1",
            "0.1,0.2,0.3",
            "a,1",
            "0,0",
            "0,-1",
            "0,inf",
            "nan,1",
            "0.1,0.2;",
            "auto,1",
        ] {
            let e = parse_normalize_flag(bad).unwrap_err().to_string();
            assert!(e.contains("--normalize"), "{bad}: {e}");
        }
    }

    #[test]
    fn channel_count_rules() {
        let one = Normalization::uniform(0.5, 0.25).unwrap();
        let three = one.for_channels(3).unwrap();
        assert_eq!(three.mean, vec![0.5; 3]);
        assert!(three.for_channels(3).is_ok());
        let e = three.for_channels(1).unwrap_err().to_string();
        assert!(
            e.contains("3 (mean, std) pairs") && e.contains("1 channel"),
            "{e}"
        );
        assert_eq!(one.normalized_zero(), vec![-2.0]);
    }
}

//! `--norm`: replace every BatchNorm of a model with another normalizer, under the same module
//! names, so that a network's checkpoint names stay PyTorch's (`weight`, `bias`, and the
//! running statistics where the normalizer has them).

use super::spec::{Child, ModelSpec, Node, RenormSpec};
use crate::{Error, Result};

/// A normalizer that `--norm` can put in place of batch normalization.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NormChoice {
    /// Batch normalization as the model file has it (no change).
    Bn,
    /// Group normalization with `G` groups (`gn:G`; instance norm is `G = C`).
    Gn(usize),
    /// Layer normalization (`ln`): over the features of an example, or over (C, H, W) of a
    /// feature map with per-channel affine (group norm with one group).
    Ln,
    /// Batch renormalization (`brn`, or `brn:RMAX:DMAX`; default 3 and 5, the paper's).
    Brn(RenormSpec),
    /// Ghost batch normalization over virtual batches of `g` examples (`ghost:g`).
    Ghost(usize),
    /// No normalization (`none`): each BatchNorm removed, the layer before it given a bias.
    None,
    /// "Noisy BN" (`noisy-bn`, Santurkar et al. 2018): each BatchNorm followed by
    /// [`crate::nn::Noise`] with their distributions; the same state (and names) as BN, and the
    /// same network at inference.
    NoisyBn,
}

impl NormChoice {
    /// Parse `bn`, `gn:G`, `ln`, `brn[:RMAX:DMAX]`, `ghost:G`, `noisy-bn` or `none`.
    pub fn parse(s: &str) -> Result<NormChoice> {
        let bad = |why: &str| {
            Error::config(
                "--norm",
                format!(
                    "'{s}': {why} (expected bn, gn:G, ln, brn[:RMAX:DMAX], ghost:G, noisy-bn or none)"
                ),
            )
        };
        let count = |v: &str, what: &str| -> Result<usize> {
            match v.parse::<usize>() {
                Ok(g) if g >= 1 => Ok(g),
                _ => Err(bad(&format!("{what} must be a positive integer"))),
            }
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts[..] {
            ["bn"] => Ok(NormChoice::Bn),
            ["ln"] => Ok(NormChoice::Ln),
            ["none"] => Ok(NormChoice::None),
            ["noisy-bn"] => Ok(NormChoice::NoisyBn),
            ["gn", g] => Ok(NormChoice::Gn(count(g, "the group count")?)),
            ["ghost", g] => Ok(NormChoice::Ghost(count(g, "the ghost batch size")?)),
            ["brn"] => Ok(NormChoice::Brn(RenormSpec {
                rmax: 3.0,
                dmax: 5.0,
            })),
            ["brn", r, d] => {
                let rmax: f64 = r.parse().map_err(|_| bad("RMAX must be a number"))?;
                let dmax: f64 = d.parse().map_err(|_| bad("DMAX must be a number"))?;
                if !(rmax.is_finite() && rmax >= 1.0) {
                    return Err(bad("RMAX must be at least 1"));
                }
                if !(dmax.is_finite() && dmax >= 0.0) {
                    return Err(bad("DMAX must be at least 0"));
                }
                Ok(NormChoice::Brn(RenormSpec { rmax, dmax }))
            }
            _ => Err(bad("unknown normalizer")),
        }
    }

    /// The short name used in reports and results.json: `bn`, `gn`, `ln`, `brn`, `ghost`,
    /// `noisy-bn`, `none`.
    pub fn key(&self) -> &'static str {
        match self {
            NormChoice::Bn => "bn",
            NormChoice::Gn(_) => "gn",
            NormChoice::Ln => "ln",
            NormChoice::Brn(_) => "brn",
            NormChoice::Ghost(_) => "ghost",
            NormChoice::None => "none",
            NormChoice::NoisyBn => "noisy-bn",
        }
    }

    /// The flag's value that gives this choice back (`gn:4`, `brn:3:5`).
    pub fn flag(&self) -> String {
        match self {
            NormChoice::Gn(g) => format!("gn:{g}"),
            NormChoice::Ghost(g) => format!("ghost:{g}"),
            NormChoice::Brn(r) => format!("brn:{}:{}", r.rmax, r.dmax),
            other => other.key().to_string(),
        }
    }
}

/// `spec` with every BatchNorm replaced as `choice` says. Batch renorm and ghost BN keep the
/// name (their state is BN's); group and layer norm are named `<name>-gn4`, `<name>-ln`; `none`
/// is [`crate::fold::plain_spec`]'s result (the matching preset where there is one). A model
/// without BatchNorm is refused for any choice but `bn`.
pub fn apply_norm(spec: &ModelSpec, choice: NormChoice) -> Result<ModelSpec> {
    if choice == NormChoice::Bn {
        return Ok(spec.clone());
    }
    if !spec.has_batch_norm() {
        return Err(Error::config(
            "--norm",
            format!(
                "{} has no BatchNorm to replace with {}",
                spec.name,
                choice.flag()
            ),
        ));
    }
    if choice == NormChoice::None {
        return crate::fold::plain_spec(spec);
    }
    let mut out = spec.clone();
    out.layers = replace(&spec.layers, choice)?;
    // Batch renorm, ghost BN and noisy BN keep BN's state and its name: their checkpoints are
    // BN checkpoints, loadable either way.
    if !matches!(
        choice,
        NormChoice::Brn(_) | NormChoice::Ghost(_) | NormChoice::NoisyBn
    ) {
        out.name = format!("{}-{}", spec.name, choice.flag().replace(':', ""));
    }
    Ok(out)
}

fn replace(children: &[Child], choice: NormChoice) -> Result<Vec<Child>> {
    children
        .iter()
        .map(|c| {
            Ok(Child {
                name: c.name.clone(),
                node: replace_node(&c.node, choice)?,
            })
        })
        .collect()
}

fn replace_node(node: &Node, choice: NormChoice) -> Result<Node> {
    Ok(match node {
        Node::BatchNorm {
            num_features,
            two_d,
            eps,
            momentum,
            affine,
            ..
        } => match choice {
            NormChoice::Brn(r) => Node::BatchNorm {
                num_features: *num_features,
                two_d: *two_d,
                eps: *eps,
                momentum: *momentum,
                affine: *affine,
                ghost: None,
                renorm: Some(r),
            },
            NormChoice::Ghost(g) => Node::BatchNorm {
                num_features: *num_features,
                two_d: *two_d,
                eps: *eps,
                momentum: *momentum,
                affine: *affine,
                ghost: Some(g),
                renorm: None,
            },
            NormChoice::Gn(groups) => Node::GroupNorm {
                groups,
                num_channels: *num_features,
                eps: *eps,
                affine: *affine,
            },
            // Over the features of an example (BatchNorm1d's place) or over (C, H, W) of a
            // feature map with per-channel affine (BatchNorm2d's).
            NormChoice::Ln => Node::LayerNorm {
                normalized_shape: if *two_d {
                    None
                } else {
                    num_features.map(|f| vec![f])
                },
                eps: *eps,
                affine: *affine,
            },
            // The BatchNorm and its noise under the BatchNorm's name: `Some("")` adds no
            // naming level, so the state keeps BN's names.
            NormChoice::NoisyBn => Node::Sequential {
                layers: vec![
                    Child {
                        name: Some(String::new()),
                        node: node.clone(),
                    },
                    Child {
                        name: Some(String::new()),
                        node: Node::Noise(crate::nn::NoiseSpec::default()),
                    },
                ],
            },
            NormChoice::Bn | NormChoice::None => node.clone(),
        },
        Node::Sequential { layers } => Node::Sequential {
            layers: replace(layers, choice)?,
        },
        Node::Concat { branches } => Node::Concat {
            branches: replace(branches, choice)?,
        },
        Node::Residual {
            layers,
            shortcut,
            relu,
        } => Node::Residual {
            layers: replace(layers, choice)?,
            shortcut: match shortcut {
                Some(s) => Some(Box::new(Child {
                    name: s.name.clone(),
                    node: replace_node(&s.node, choice)?,
                })),
                None => None,
            },
            relu: *relu,
        },
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_choice_and_refuses_the_rest() {
        assert_eq!(NormChoice::parse("bn").unwrap(), NormChoice::Bn);
        assert_eq!(NormChoice::parse("gn:4").unwrap(), NormChoice::Gn(4));
        assert_eq!(NormChoice::parse("ln").unwrap(), NormChoice::Ln);
        assert_eq!(NormChoice::parse("ghost:8").unwrap(), NormChoice::Ghost(8));
        assert_eq!(NormChoice::parse("none").unwrap(), NormChoice::None);
        assert_eq!(NormChoice::parse("noisy-bn").unwrap(), NormChoice::NoisyBn);
        assert_eq!(
            NormChoice::parse("brn").unwrap(),
            NormChoice::Brn(RenormSpec {
                rmax: 3.0,
                dmax: 5.0
            })
        );
        assert_eq!(
            NormChoice::parse("brn:1.5:0.5").unwrap().flag(),
            "brn:1.5:0.5"
        );
        for bad in [
            "",
            "gn",
            "gn:0",
            "gn:x",
            "ghost:",
            "brn:0.5:1",
            "brn:2:-1",
            "bn:2",
            "layer",
        ] {
            let e = NormChoice::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("--norm") && e.contains("expected bn"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn replaces_every_batch_norm_under_its_name() {
        let spec = crate::model::preset("resnet20-bn").unwrap();
        let ghost = apply_norm(&spec, NormChoice::Ghost(8)).unwrap();
        assert_eq!(
            ghost.name, "resnet20-bn",
            "ghost BN checkpoints are BN checkpoints"
        );
        let text = ghost.to_json().to_string();
        let again = ModelSpec::parse(&text, "test").unwrap();
        assert_eq!(again.to_json().to_string(), text, "round trip");
        let bns = spec.to_json().to_string().matches("BatchNorm2d").count();
        assert_eq!(
            text.matches("\"ghost_batch_size\":8").count(),
            bns,
            "{text}"
        );
        assert!(bns >= 19);
        let gn = apply_norm(&spec, NormChoice::Gn(4)).unwrap();
        assert_eq!(gn.name, "resnet20-bn-gn4");
        let text = gn.to_json().to_string();
        assert_eq!(text.matches("\"GroupNorm\"").count(), bns, "{text}");
        assert!(!text.contains("BatchNorm"));
        let ln = apply_norm(&spec, NormChoice::Ln).unwrap();
        assert_eq!(
            ln.to_json().to_string().matches("\"LayerNorm\"").count(),
            bns
        );
        let input = crate::model::resolve_input(&gn, Some(&[1, 28, 28])).unwrap();
        crate::model::build(&gn, &input, 0, false).unwrap();
        let mlp = crate::model::preset("mlp-fig1-bn").unwrap();
        let ln = apply_norm(&mlp, NormChoice::Ln).unwrap();
        let input = crate::model::resolve_input(&ln, Some(&[1, 28, 28])).unwrap();
        crate::model::build(&ln, &input, 0, false).unwrap();
        // Groups that do not divide the channels are refused when the network is built.
        let gn5 = apply_norm(&spec, NormChoice::Gn(5)).unwrap();
        let input = crate::model::resolve_input(&gn5, Some(&[1, 28, 28])).unwrap();
        let e = match crate::model::build(&gn5, &input, 0, false) {
            Ok(_) => panic!("5 groups of 16 channels were accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("bn1") && e.contains('5'), "{e}");
        let plain = apply_norm(&spec, NormChoice::None).unwrap();
        assert_eq!(plain.name, "resnet20");
        let none = crate::model::preset("resnet20").unwrap();
        let e = apply_norm(&none, NormChoice::Ghost(8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("has no BatchNorm"), "{e}");
        assert_eq!(apply_norm(&none, NormChoice::Bn).unwrap().name, "resnet20");
    }
}

//! Containers whose children have explicit `state_dict` names, for modules that hold their
//! children as attributes (`self.conv`, `self.bn`, `self.act`) instead of in an
//! `nn.Sequential`.
//!
//! A `NamedSequential` is a `Sequential` built with `Sequential::named`: the same chain and
//! buffers, only the names differ. An empty name adds no level: the child's tensors are named
//! as if they belonged to the container itself. That expresses the calls a PyTorch `forward`
//! makes outside any submodule: in `self.b4(F.avg_pool2d(x, 3, 1, 1))` the pool is part of the
//! computation but not of the module tree, so the branch is
//! `Sequential::named(vec![("", pool), ("", conv_unit)])` and its tensors come out as
//! `b4.conv.weight`, not `b4.1.conv.weight`.
//!
//! Names are checked when the container is built: no dots (they separate levels), no name
//! twice at one level.

use super::{Layer, Sequential};
use crate::{Error, Result};

/// A `Sequential` with explicit child names (see the module doc).
pub type NamedSequential = Sequential;

/// The prefix for a child called `name` inside a container whose prefix is `prefix` (which is
/// empty or ends with a dot).
pub(crate) fn child_prefix(prefix: &str, name: &str) -> String {
    if name.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}{name}.")
    }
}

impl Sequential {
    /// A chain whose children are named explicitly, e.g. `[("conv", ..), ("bn", ..),
    /// ("act", ..)]`; an empty name adds no level to the names inside.
    ///
    /// An error if there is no child, a name contains a dot or is used twice, or a child does
    /// not take as many inputs as the one before it gives.
    pub fn named(children: Vec<(&str, Box<dyn Layer>)>) -> Result<Sequential> {
        let (names, layers): (Vec<String>, Vec<Box<dyn Layer>>) = children
            .into_iter()
            .map(|(n, l)| (n.to_string(), l))
            .unzip();
        if layers.is_empty() {
            return Err(Error::Shape("a Sequential needs at least one child".into()));
        }
        check_names(&names)?;
        let mut s = Sequential::new(layers);
        s.names = Some(names);
        s.check_chain()?;
        Ok(s)
    }

    /// Each child's name: explicit, or its index as in PyTorch.
    pub fn child_names(&self) -> Vec<String> {
        match &self.names {
            Some(n) => n.clone(),
            None => (0..self.layers.len()).map(|i| i.to_string()).collect(),
        }
    }

    /// Every child takes as many inputs as the one before it gives; else an error
    /// (`Error::Shape`) naming the two.
    pub fn check_chain(&self) -> Result<()> {
        let names = self.child_names();
        let name = |j: usize| match names[j].as_str() {
            "" => format!("#{j} (unnamed)"),
            n => format!("'{n}'"),
        };
        let first_line =
            |l: &dyn Layer| l.describe().lines().next().unwrap_or_default().to_string();
        for (i, pair) in self.layers.windows(2).enumerate() {
            if pair[0].out_size() != pair[1].in_size() {
                return Err(Error::Shape(format!(
                    "child {} ({}) takes {} inputs, child {} ({}) gives {}",
                    name(i + 1),
                    first_line(pair[1].as_ref()),
                    pair[1].in_size(),
                    name(i),
                    first_line(pair[0].as_ref()),
                    pair[0].out_size()
                )));
            }
        }
        Ok(())
    }
}

/// Names must be usable as `state_dict` keys and distinct (empty names excepted: they add no
/// level, so they cannot collide at this one); an error (`Error::Config`) says which is not.
pub(crate) fn check_names(names: &[String]) -> Result<()> {
    for (i, n) in names.iter().enumerate() {
        if n.contains('.') {
            return Err(Error::config(
                "layer names",
                format!("child name '{n}' contains a dot"),
            ));
        }
        if !n.is_empty() && names[..i].contains(n) {
            return Err(Error::config(
                "layer names",
                format!("child name '{n}' used twice"),
            ));
        }
    }
    Ok(())
}

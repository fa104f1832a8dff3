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

use super::{Layer, Sequential};

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
    pub fn named(children: Vec<(&str, Box<dyn Layer>)>) -> Sequential {
        let (names, layers): (Vec<String>, Vec<Box<dyn Layer>>) = children
            .into_iter()
            .map(|(n, l)| (n.to_string(), l))
            .unzip();
        check_names(&names);
        let mut s = Sequential::new(layers);
        s.names = Some(names);
        s
    }

    /// Each child's name: explicit, or its index as in PyTorch.
    pub fn child_names(&self) -> Vec<String> {
        match &self.names {
            Some(n) => n.clone(),
            None => (0..self.layers.len()).map(|i| i.to_string()).collect(),
        }
    }
}

/// Names must be usable as `state_dict` keys and distinct (empty names excepted: they add no
/// level, so they cannot collide at this one).
pub(crate) fn check_names(names: &[String]) {
    for (i, n) in names.iter().enumerate() {
        assert!(!n.contains('.'), "child name '{n}' contains a dot");
        assert!(
            n.is_empty() || !names[..i].contains(n),
            "child name '{n}' used twice"
        );
    }
}

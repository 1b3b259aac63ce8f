//! The two pools of a service.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One of the two pools of every service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    /// The blue pool.
    Blue,
    /// The green pool.
    Green,
}

impl Color {
    /// Both colors, blue first.
    pub(crate) const ALL: [Color; 2] = [Color::Blue, Color::Green];

    /// The other pool.
    pub const fn other(self) -> Color {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    /// 0 for blue, 1 for green: an index into `[T; 2]` per-pool arrays.
    pub(crate) const fn index(self) -> usize {
        match self {
            Color::Blue => 0,
            Color::Green => 1,
        }
    }

    /// `"blue"` or `"green"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

impl fmt::Display for Color {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Color {
    type Err = ();

    /// Exactly `blue` or `green` (lowercase, as in configs and URLs).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "blue" => Ok(Color::Blue),
            "green" => Ok(Color::Green),
            _ => Err(()),
        }
    }
}

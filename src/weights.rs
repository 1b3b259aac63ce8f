//! Traffic weights: the green share of a service in basis points, and which
//! pool is live. Shared by the control plane (which sets them) and the data
//! plane (which picks a pool with them).

use std::fmt;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

use crate::color::Color;

/// Traffic weights of one service, held as the green share in basis points
/// (0..=10000, so 0.01 % steps); blue gets the rest, so they always sum to 100 %.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Weights {
    green_bp: u16,
}

/// Which pool is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Live {
    /// One pool has 100 %.
    Full(Color),
    /// Both pools take traffic.
    Split,
}

impl Live {
    /// `"blue"`, `"green"` or `"split"`, as in the service object.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Live::Full(c) => c.as_str(),
            Live::Split => "split",
        }
    }
}

impl Weights {
    /// All traffic to `color`.
    pub(crate) const fn full(color: Color) -> Weights {
        match color {
            Color::Blue => Weights { green_bp: 0 },
            Color::Green => Weights { green_bp: 10_000 },
        }
    }

    /// Green share as a percentage (`10`, `12.5`); an error message names
    /// what is wrong with it (range, more than two decimals, not finite).
    pub fn from_green_percent(pct: f64) -> Result<Weights, String> {
        if !pct.is_finite() || !(0.0..=100.0).contains(&pct) {
            return Err(format!("must be a number from 0 to 100, got {pct}"));
        }
        let bp = (pct * 100.0).round();
        if (bp - pct * 100.0).abs() > 1e-6 {
            return Err(format!("at most two decimals (0.01 % steps), got {pct}"));
        }
        // In range by the check above, so the cast is exact.
        Ok(Weights {
            green_bp: bp as u16,
        })
    }

    /// Green share in basis points (0..=10000).
    #[cfg(test)]
    pub(crate) const fn green_bp(self) -> u16 {
        self.green_bp
    }

    /// Share of `color` in basis points.
    pub(crate) const fn bp(self, color: Color) -> u16 {
        match color {
            Color::Blue => 10_000 - self.green_bp,
            Color::Green => self.green_bp,
        }
    }

    /// Share of `color` as a percentage (0..=100, two decimals).
    pub fn percent(self, color: Color) -> f64 {
        f64::from(self.bp(color)) / 100.0
    }

    /// Which pool is live.
    pub(crate) const fn live(self) -> Live {
        match self.green_bp {
            0 => Live::Full(Color::Blue),
            10_000 => Live::Full(Color::Green),
            _ => Live::Split,
        }
    }

    /// Does `color` take any traffic?
    pub(crate) const fn takes_traffic(self, color: Color) -> bool {
        self.bp(color) > 0
    }

    /// The pool a request with this bucket (0..=9999) goes to: buckets
    /// below the green share go green. Raising the green share only ever
    /// moves buckets from blue to green (SPEC §3).
    #[inline]
    pub const fn pick(self, bucket: u16) -> Color {
        if bucket < self.green_bp {
            Color::Green
        } else {
            Color::Blue
        }
    }
}

/// A percentage as JSON: an integer when whole (`90`), else two decimals (`12.5`).
fn serialize_percent<S: Serializer>(bp: u16, s: S) -> Result<S::Ok, S::Error> {
    if bp % 100 == 0 {
        s.serialize_u64(u64::from(bp / 100))
    } else {
        s.serialize_f64(f64::from(bp) / 100.0)
    }
}

impl Serialize for Weights {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Pct(u16);
        impl Serialize for Pct {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                serialize_percent(self.0, s)
            }
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("blue", &Pct(self.bp(Color::Blue)))?;
        m.serialize_entry("green", &Pct(self.bp(Color::Green)))?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for Weights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            blue: f64,
            green: f64,
        }
        let raw = Raw::deserialize(d)?;
        let w = Weights::from_green_percent(raw.green).map_err(de::Error::custom)?;
        if (w.percent(Color::Blue) - raw.blue).abs() > 1e-6 {
            return Err(de::Error::custom(format!(
                "weights must sum to 100, got blue {} + green {}",
                raw.blue, raw.green
            )));
        }
        Ok(w)
    }
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "blue {}% / green {}%",
            self.percent(Color::Blue),
            self.percent(Color::Green)
        )
    }
}

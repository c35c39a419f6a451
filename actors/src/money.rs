//! Money as integer minor units of the auction's currency (`15000` EUR cents is
//! 150.00 EUR). Never floats. `Money::parse` is the one gate every amount from
//! the outside passes, so the rules never see an amount out of range.

use std::fmt;

/// The largest amount anyone may name: 10^13 minor units.
pub const MAX_AMOUNT_MINOR: i64 = 10_000_000_000_000;

/// An amount in minor units, always within `1..=MAX_AMOUNT_MINOR` when built by
/// [`Money::parse`]. Arithmetic is checked: prices stay far below `i64::MAX`
/// (at most twice the largest amount), and overflow would be a bug, not a
/// rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Money(i64);

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("amount must be an integer in 1..=10^13 minor units")]
pub struct InvalidAmount;

impl Money {
    /// Accepts an amount named by a client or read back from storage.
    pub fn parse(minor_units: i64) -> Result<Money, InvalidAmount> {
        if (1..=MAX_AMOUNT_MINOR).contains(&minor_units) { Ok(Money(minor_units)) } else { Err(InvalidAmount) }
    }

    pub fn minor_units(self) -> i64 {
        self.0
    }

    /// `self + other`; the sum of two valid amounts always fits, so `None`
    /// means a corrupted value reached the rules.
    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_exactly_the_documented_range() {
        assert_eq!(Money::parse(0), Err(InvalidAmount));
        assert_eq!(Money::parse(-5), Err(InvalidAmount));
        assert_eq!(Money::parse(1).map(Money::minor_units), Ok(1));
        assert_eq!(Money::parse(MAX_AMOUNT_MINOR).map(Money::minor_units), Ok(MAX_AMOUNT_MINOR));
        assert_eq!(Money::parse(MAX_AMOUNT_MINOR + 1), Err(InvalidAmount));
        assert_eq!(Money::parse(i64::MAX), Err(InvalidAmount));
    }

    #[test]
    fn addition_is_checked() {
        let max = Money::parse(MAX_AMOUNT_MINOR).unwrap();
        assert_eq!(max.checked_add(max).map(Money::minor_units), Some(2 * MAX_AMOUNT_MINOR));
        assert_eq!(Money(i64::MAX).checked_add(Money(1)), None);
    }
}

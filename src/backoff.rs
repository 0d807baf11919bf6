//! The exponential backoff of the token source's retries and of the cache's cool-down.

use std::time::Duration;

/// The pause before attempt `attempt + 1` after `attempt` failures in a row (`attempt` from
/// 1): `first`, doubled for each failure after the first, at most `max`.
pub(crate) fn exponential(first: Duration, attempt: u32, max: Duration) -> Duration {
    // Past 2^16 the doubling has passed any sensible `max`; the cap keeps the shift in range.
    first
        .saturating_mul(1 << attempt.saturating_sub(1).min(16))
        .min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_first_up_to_the_max() {
        let second = Duration::from_secs(1);
        let max = Duration::from_secs(30);
        let pauses: Vec<u64> = (1..=7)
            .map(|attempt| exponential(second, attempt, max).as_secs())
            .collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(exponential(second, 0, max), second);
        assert_eq!(exponential(second, u32::MAX, max), max);
        assert_eq!(exponential(Duration::MAX, 3, Duration::MAX), Duration::MAX);
    }
}

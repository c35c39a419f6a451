//! The real clock, the one place the server reads wall-clock time for the rules.

use gavel_actors::TimestampMs;
use gavel_actors::ports::Clock;

pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> TimestampMs {
        chrono::Utc::now().timestamp_millis()
    }
}

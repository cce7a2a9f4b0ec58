//! Bandwidth caps: a token bucket shared by every stream in one direction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// A token bucket of `rate` bytes per second with one second of burst (0: unlimited).
#[derive(Debug, Clone)]
pub struct Limiter {
    inner: Option<Arc<Mutex<Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Limiter {
    /// A limiter for `bytes_per_sec` (0: no limit).
    pub fn new(bytes_per_sec: u64) -> Limiter {
        if bytes_per_sec == 0 {
            return Limiter { inner: None };
        }
        let rate = bytes_per_sec as f64;
        Limiter {
            inner: Some(Arc::new(Mutex::new(Bucket { rate, tokens: rate, last: Instant::now() }))),
        }
    }

    /// Waits until `n` bytes may pass.
    pub async fn take(&self, n: usize) {
        let Some(inner) = &self.inner else { return };
        let wait = {
            let mut b = inner.lock().await;
            let now = Instant::now();
            b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * b.rate).min(b.rate);
            b.last = now;
            b.tokens -= n as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / b.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

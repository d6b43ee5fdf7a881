//! Retry decisions, as Envoy's router makes them (`RetryStateImpl`): which outcomes a
//! `retry_on` policy retries, which requests may be retried at all, and the back-off.

use std::time::Duration;

use http::Response;
use sluice_config::model::{HeaderMatchSpec, HeaderMatcher, RetryPolicy};

use crate::upstream::{UpstreamBody, UpstreamError};

/// What one upstream attempt produced.
pub enum Attempt {
    Response(Box<Response<UpstreamBody>>),
    Error(UpstreamError),
    /// The per-try or the whole-request timeout fired. `global` is the latter (never retried).
    Timeout {
        global: bool,
    },
}

impl Attempt {
    pub fn from_result(r: Result<Response<UpstreamBody>, UpstreamError>) -> Attempt {
        match r {
            Ok(r) => Attempt::Response(Box::new(r)),
            Err(e) => Attempt::Error(e),
        }
    }
}

/// Whether `policy` retries this outcome.
pub fn should_retry(policy: &RetryPolicy, attempt: &Attempt) -> bool {
    let on = &policy.retry_on;
    match attempt {
        Attempt::Response(r) => {
            let status = r.status().as_u16();
            if on.five_xx && status >= 500 {
                return true;
            }
            if on.gateway_error && matches!(status, 502..=504) {
                return true;
            }
            if on.retriable_4xx && status == 409 {
                return true;
            }
            if on.retriable_status_codes && policy.retriable_status_codes.contains(&status) {
                return true;
            }
            if on.retriable_headers && policy.retriable_headers.iter().any(|m| header_matches(m, r.headers())) {
                return true;
            }
            // gRPC status in a trailers-only response.
            if let Some(code) = crate::http::grpc_web::grpc_status(r.headers()) {
                return match code {
                    1 => on.grpc_cancelled,
                    4 => on.grpc_deadline_exceeded,
                    8 => on.grpc_resource_exhausted,
                    13 => on.grpc_internal,
                    14 => on.grpc_unavailable,
                    _ => false,
                };
            }
            false
        }
        Attempt::Error(e) => {
            if e.is_overflow() {
                return false;
            }
            // 5xx and gateway-error cover every reset and connect failure (Envoy:
            // `wouldRetryFromReset`).
            if on.five_xx || on.gateway_error {
                return true;
            }
            if on.connect_failure && e.is_connect_failure() {
                return true;
            }
            if on.refused_stream && e.is_refused_stream() {
                return true;
            }
            if (on.reset || on.reset_before_request) && (e.is_reset() || e.is_connect_failure()) {
                return true;
            }
            false
        }
        // A per-try timeout is retried like a 504 (Envoy: 5xx and gateway-error).
        Attempt::Timeout { global } => !global && (on.five_xx || on.gateway_error),
    }
}

/// `retriable_request_headers`: when set, only matching requests are retried.
pub fn request_allowed(policy: &RetryPolicy, headers: &http::HeaderMap) -> bool {
    policy.retriable_request_headers.is_empty()
        || policy.retriable_request_headers.iter().any(|m| header_matches(m, headers))
}

fn header_matches(m: &HeaderMatcher, headers: &http::HeaderMap) -> bool {
    let value = headers.get(m.name.as_str()).and_then(|v| v.to_str().ok());
    let hit = match (&m.spec, value) {
        (HeaderMatchSpec::Present(p), v) => v.is_some() == *p,
        (HeaderMatchSpec::String(s), Some(v)) => s.matches(v),
        (HeaderMatchSpec::Range { start, end }, Some(v)) => v.parse::<i64>().is_ok_and(|n| n >= *start && n < *end),
        (_, None) => false,
    };
    hit != m.invert_match
}

/// Envoy's back-off: fully jittered exponential, `random(0, base * 2^(n-1))`, capped at
/// `max_interval` (defaults 25 ms and 250 ms).
pub fn backoff(policy: Option<&RetryPolicy>, attempt: u32) -> Duration {
    let (base, max) = policy
        .map(|p| (p.back_off_base, p.back_off_max))
        .unwrap_or((Duration::from_millis(25), Duration::from_millis(250)));
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exp.min(max).as_micros() as u64;
    if ceiling == 0 {
        return Duration::ZERO;
    }
    Duration::from_micros(rand::random::<u64>() % ceiling)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_config::model::RetryOn;

    fn policy(on: RetryOn) -> RetryPolicy {
        RetryPolicy {
            retry_on: on,
            num_retries: 3,
            per_try_timeout: None,
            per_try_idle_timeout: None,
            retriable_status_codes: vec![418],
            back_off_base: Duration::from_millis(25),
            back_off_max: Duration::from_millis(250),
            retriable_headers: vec![],
            retriable_request_headers: vec![],
            host_selection_retry_max_attempts: 1,
        }
    }

    fn resp(status: u16) -> Attempt {
        let mut r = Response::new(UpstreamBody::empty());
        *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
        Attempt::Response(Box::new(r))
    }

    #[test]
    fn five_xx_and_gateway_error() {
        let p = policy(RetryOn { five_xx: true, ..Default::default() });
        assert!(should_retry(&p, &resp(500)));
        assert!(should_retry(&p, &resp(503)));
        assert!(!should_retry(&p, &resp(404)));
        assert!(should_retry(&p, &Attempt::Timeout { global: false }));
        assert!(!should_retry(&p, &Attempt::Timeout { global: true }));
        let g = policy(RetryOn { gateway_error: true, ..Default::default() });
        assert!(!should_retry(&g, &resp(500)));
        assert!(should_retry(&g, &resp(502)));
    }

    #[test]
    fn status_codes_and_4xx() {
        let p = policy(RetryOn { retriable_status_codes: true, retriable_4xx: true, ..Default::default() });
        assert!(should_retry(&p, &resp(418)));
        assert!(should_retry(&p, &resp(409)));
        assert!(!should_retry(&p, &resp(500)));
    }

    #[test]
    fn backoff_is_bounded() {
        let p = policy(RetryOn::default());
        for n in 1..10 {
            let b = backoff(Some(&p), n);
            assert!(b < Duration::from_millis(250), "{b:?}");
        }
        assert!(backoff(Some(&p), 1) < Duration::from_millis(25));
    }
}

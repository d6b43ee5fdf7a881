//! Per-stream and per-connection timers: Envoy's `stream_idle_timeout` (overridden by a
//! route's `idle_timeout`), `max_stream_duration` (the connection manager's, overridden by a
//! route's `max_stream_duration.max_stream_duration`), and the connection `idle_timeout`.
//!
//! One [`StreamClock`] per request records when its stream last moved (a request or
//! response frame) and when it must end. Before the response starts, the connection manager
//! races the request against [`StreamClock::expired`] and answers `408` on expiry, as Envoy
//! does (`stream timeout`, `downstream duration timeout`); after it started, the response
//! body ([`ClockedBody`]) fails the stream instead: hyper resets an HTTP/2 stream and closes
//! an HTTP/1 connection, which is what Envoy does too.
//!
//! Frames only store a timestamp; the timer is re-armed lazily, when it fires, so a busy
//! stream costs an atomic store per frame rather than a timer reset.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use super::local_reply::LocalReason;
use crate::body::{Body, BoxError};

/// `u64::MAX` milliseconds: the timer is off.
const OFF: u64 = u64::MAX;

/// The timers of one stream.
pub struct StreamClock {
    start: Instant,
    /// Milliseconds from `start` to the last frame.
    last: AtomicU64,
    /// The idle timeout in milliseconds, or [`OFF`].
    idle: AtomicU64,
    /// The maximum duration in milliseconds, or [`OFF`].
    max: AtomicU64,
}

fn millis(d: Option<Duration>) -> u64 {
    d.filter(|d| !d.is_zero()).map_or(OFF, |d| d.as_millis().min(u128::from(OFF - 1)) as u64)
}

impl StreamClock {
    /// `None` when neither timer is configured.
    pub fn new(idle: Option<Duration>, max: Option<Duration>) -> Option<Arc<StreamClock>> {
        (idle.is_some() || max.is_some()).then(|| {
            Arc::new(StreamClock {
                start: Instant::now(),
                last: AtomicU64::new(0),
                idle: AtomicU64::new(millis(idle)),
                max: AtomicU64::new(millis(max)),
            })
        })
    }

    /// A frame went by.
    pub fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The route's `idle_timeout` replaces the connection manager's; `0s` turns it off.
    pub fn set_idle(&self, idle: Duration) {
        self.idle.store(millis(Some(idle)), Ordering::Relaxed);
    }

    /// The route's `max_stream_duration` replaces the connection manager's; `0s` turns it off.
    pub fn set_max(&self, max: Duration) {
        self.max.store(millis(Some(max)), Ordering::Relaxed);
    }

    /// The next instant at which a timer may have expired, and which one expires there; `None`
    /// when both are off.
    fn next_deadline(&self) -> Option<(Instant, LocalReason)> {
        let idle = self.idle.load(Ordering::Relaxed);
        let max = self.max.load(Ordering::Relaxed);
        let idle_at = (idle != OFF).then(|| self.last.load(Ordering::Relaxed).saturating_add(idle));
        let max_at = (max != OFF).then_some(max);
        let (at, reason) = match (idle_at, max_at) {
            (Some(i), Some(m)) if m <= i => (m, LocalReason::MaxStreamDuration),
            (Some(i), _) => (i, LocalReason::StreamIdleTimeout),
            (None, Some(m)) => (m, LocalReason::MaxStreamDuration),
            (None, None) => return None,
        };
        Some((self.start + Duration::from_millis(at), reason))
    }

    /// Polls the stream's timers: `Ready` with the reason once one has expired. `sleep` is the
    /// caller's timer, armed and re-armed here.
    pub fn poll_expired(&self, sleep: &mut Option<Pin<Box<Sleep>>>, cx: &mut Context<'_>) -> Poll<LocalReason> {
        loop {
            let Some((at, reason)) = self.next_deadline() else {
                // Both timers are off (a route turned them off): nothing to wait for.
                *sleep = None;
                return Poll::Pending;
            };
            if at <= Instant::now() {
                return Poll::Ready(reason);
            }
            match sleep {
                Some(s) if s.deadline() == at => {
                    ready!(s.as_mut().poll(cx));
                }
                Some(s) => s.as_mut().reset(at),
                None => *sleep = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A request racing its stream's timers until the response starts: `Err` carries the
    /// timer that expired first.
    pub struct BeforeResponse<F> {
        #[pin]
        fut: F,
        clock: Arc<StreamClock>,
        sleep: Option<Pin<Box<Sleep>>>,
    }
}

impl<F> BeforeResponse<F> {
    pub fn new(fut: F, clock: Arc<StreamClock>) -> Self {
        BeforeResponse { fut, clock, sleep: None }
    }
}

impl<F: Future> Future for BeforeResponse<F> {
    type Output = Result<F::Output, LocalReason>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        this.clock.poll_expired(this.sleep, cx).map(Err)
    }
}

/// A request or response body that touches its stream's clock on every frame; a response
/// body also fails the stream when a timer expires while it waits, and keeps the stream
/// counted as active on its connection until it is done.
pub struct ClockedBody {
    inner: Body,
    clock: Option<Arc<StreamClock>>,
    /// Armed only for response bodies.
    sleep: Option<Pin<Box<Sleep>>>,
    enforce: bool,
    _active: Option<ActiveStream>,
}

impl ClockedBody {
    /// A request body: it only feeds the clock (the connection manager enforces the timers
    /// until the response starts).
    pub fn request(inner: Body, clock: Arc<StreamClock>) -> Body {
        crate::body::boxed(ClockedBody { inner, clock: Some(clock), sleep: None, enforce: false, _active: None })
    }

    /// A response body: it feeds the clock and enforces the timers (when there are any), and
    /// holds the stream's place among its connection's active streams.
    pub fn response(inner: Body, clock: Option<Arc<StreamClock>>, active: ActiveStream) -> Body {
        let enforce = clock.is_some();
        crate::body::boxed(ClockedBody { inner, clock, sleep: None, enforce, _active: Some(active) })
    }
}

impl http_body::Body for ClockedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(clock) = &this.clock else { return Pin::new(&mut this.inner).poll_frame(cx) };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                clock.touch();
                Poll::Ready(frame)
            }
            Poll::Pending if this.enforce => match clock.poll_expired(&mut this.sleep, cx) {
                Poll::Ready(reason) => {
                    tracing::debug!("response stream ended by {}", reason.flag());
                    this.enforce = false;
                    Poll::Ready(Some(Err(reason.body().into())))
                }
                Poll::Pending => Poll::Pending,
            },
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Streams in flight on one downstream connection and when it last had none: what the
/// connection `idle_timeout` watches.
#[derive(Debug)]
pub struct ConnActivity {
    active: AtomicUsize,
    /// Milliseconds from `since` to the moment the last stream ended.
    idle_from: AtomicU64,
    since: Instant,
}

impl Default for ConnActivity {
    fn default() -> Self {
        ConnActivity { active: AtomicUsize::new(0), idle_from: AtomicU64::new(0), since: Instant::now() }
    }
}

impl ConnActivity {
    /// Counts a stream as active until the guard is dropped.
    pub fn stream(self: &Arc<Self>) -> ActiveStream {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveStream(self.clone())
    }

    /// Resolves once the connection has had no active stream for `timeout`.
    pub async fn idle_for(&self, timeout: Duration) {
        let mut at = self.since + timeout;
        loop {
            tokio::time::sleep_until(at).await;
            if self.active.load(Ordering::Relaxed) == 0 {
                let idle_at = self.since + Duration::from_millis(self.idle_from.load(Ordering::Relaxed)) + timeout;
                if idle_at <= Instant::now() {
                    return;
                }
                at = idle_at;
            } else {
                at = Instant::now() + timeout;
            }
        }
    }
}

/// One active stream of a connection (see [`ConnActivity`]).
pub struct ActiveStream(Arc<ConnActivity>);

impl Drop for ActiveStream {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_from.store(a.since.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_expires_only_after_a_quiet_period() {
        let clock = StreamClock::new(Some(Duration::from_secs(2)), None).unwrap();
        let mut sleep = None;
        let expired = poll_fn(|cx| Poll::Ready(clock.poll_expired(&mut sleep, cx))).await;
        assert!(expired.is_pending());
        tokio::time::advance(Duration::from_millis(1500)).await;
        clock.touch();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let expired = poll_fn(|cx| Poll::Ready(clock.poll_expired(&mut sleep, cx))).await;
        assert!(expired.is_pending(), "a frame 1.5 s ago keeps the 2 s idle timer from firing");
        let reason = poll_fn(|cx| clock.poll_expired(&mut sleep, cx)).await;
        assert_eq!(reason.flag(), "SI");
        assert!(clock.start.elapsed() >= Duration::from_millis(3500));
    }

    #[tokio::test(start_paused = true)]
    async fn max_duration_fires_despite_activity_and_routes_override() {
        let clock = StreamClock::new(Some(Duration::from_secs(2)), Some(Duration::from_secs(3))).unwrap();
        let mut sleep = None;
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(500)).await;
            clock.touch();
        }
        let reason = poll_fn(|cx| clock.poll_expired(&mut sleep, cx)).await;
        assert_eq!(reason.flag(), "DT");
        assert_eq!(clock.start.elapsed(), Duration::from_secs(3));

        let clock = StreamClock::new(Some(Duration::from_secs(2)), None).unwrap();
        clock.set_idle(Duration::ZERO);
        tokio::time::advance(Duration::from_secs(60)).await;
        let expired = poll_fn(|cx| Poll::Ready(clock.poll_expired(&mut sleep, cx))).await;
        assert!(expired.is_pending(), "a route's idle_timeout: 0s turns the timer off");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_without_active_streams() {
        let activity = Arc::new(ConnActivity::default());
        let guard = activity.stream();
        let idle = tokio::spawn({
            let a = activity.clone();
            async move { a.idle_for(Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(!idle.is_finished(), "a stream is active");
        drop(guard);
        let ended = Instant::now();
        idle.await.unwrap();
        assert!(ended.elapsed() >= Duration::from_secs(10));
    }
}

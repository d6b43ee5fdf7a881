//! A request body that can be sent more than once — for retries and mirrors — without being
//! buffered before the first attempt. The first reader streams from the client and records
//! what passes, up to a limit; later readers replay the recording and then continue from the
//! client. Past the limit the recording is abandoned and the body can no longer be replayed
//! (retries are then off for that request, as in Envoy).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::body::{Body, BoxError};

struct State {
    source: Body,
    recorded: Vec<Bytes>,
    recorded_bytes: usize,
    limit: usize,
    overflow: bool,
    trailers: Option<HeaderMap>,
    eos: bool,
    /// Replicas waiting for the source: woken when another replica reads a frame.
    waiters: Vec<Waker>,
}

/// One reader of a shared request body. Clone it to get a reader that starts from the
/// beginning.
pub struct ReplayBody {
    state: Arc<Mutex<State>>,
    pos: usize,
    trailers_sent: bool,
    done: bool,
}

impl ReplayBody {
    pub fn new(source: Body, limit: usize) -> ReplayBody {
        let state = State {
            source,
            recorded: Vec::new(),
            recorded_bytes: 0,
            limit,
            overflow: false,
            trailers: None,
            eos: false,
            waiters: Vec::new(),
        };
        ReplayBody { state: Arc::new(Mutex::new(state)), pos: 0, trailers_sent: false, done: false }
    }

    /// Whether a fresh replica would see the whole body.
    pub fn is_replayable(&self) -> bool {
        self.state.lock().map(|s| !s.overflow).unwrap_or(false)
    }

    /// Whether the client has sent the whole body.
    pub fn is_complete(&self) -> bool {
        self.state.lock().map(|s| s.eos).unwrap_or(false)
    }

    pub fn into_body(self) -> Body {
        crate::body::boxed(self)
    }
}

impl Clone for ReplayBody {
    fn clone(&self) -> Self {
        ReplayBody { state: self.state.clone(), pos: 0, trailers_sent: false, done: false }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeded the replay buffer and cannot be sent again")]
pub struct ReplayOverflow;

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let Ok(mut s) = this.state.lock() else {
            return Poll::Ready(Some(Err("replay body state poisoned".into())));
        };
        if this.pos < s.recorded.len() {
            let chunk = s.recorded[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.overflow && this.pos < usize::MAX && s.recorded_bytes > 0 && this.pos != usize::MAX {
            // Not reachable for the reader that caused the overflow (its position moves to
            // the end); any other reader would see a truncated body.
        }
        if s.eos {
            this.done = true;
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        if s.overflow && this.pos != s.recorded.len() {
            return Poll::Ready(Some(Err(Box::new(ReplayOverflow))));
        }
        match Pin::new(&mut s.source).poll_frame(cx) {
            Poll::Pending => {
                s.waiters.push(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(None) => {
                s.eos = true;
                this.done = true;
                for w in s.waiters.drain(..) {
                    w.wake();
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Some(Ok(frame))) => {
                for w in s.waiters.drain(..) {
                    w.wake();
                }
                match frame.into_data() {
                    Ok(data) => {
                        if !s.overflow {
                            if s.recorded_bytes + data.len() > s.limit {
                                s.overflow = true;
                                s.recorded.clear();
                            } else {
                                s.recorded_bytes += data.len();
                                s.recorded.push(data.clone());
                            }
                        }
                        this.pos = if s.overflow { 0 } else { s.recorded.len() };
                        if s.overflow {
                            // The overflowing reader keeps streaming; its position no longer
                            // indexes the (cleared) recording.
                            this.pos = 0;
                        }
                        Poll::Ready(Some(Ok(Frame::data(data))))
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            s.trailers = Some(t.clone());
                            s.eos = true;
                            this.trailers_sent = true;
                            this.done = true;
                            Poll::Ready(Some(Ok(Frame::trailers(t))))
                        }
                        Err(_) => Poll::Ready(None),
                    },
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        if self.done {
            return true;
        }
        self.state
            .lock()
            .map(|s| s.eos && self.pos >= s.recorded.len() && (self.trailers_sent || s.trailers.is_none()))
            .unwrap_or(false)
    }

    fn size_hint(&self) -> SizeHint {
        self.state.lock().map(|s| s.source.size_hint()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    fn chunks(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            parts.iter().map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes())))).collect();
        crate::body::boxed(StreamBody::new(futures_util::stream::iter(frames)))
    }

    #[tokio::test]
    async fn replays_after_partial_read() {
        let first = ReplayBody::new(chunks(&["a", "b", "c"]), 100);
        let mut f = first.clone();
        // The first attempt reads one frame and fails.
        let fr = f.frame().await.unwrap().unwrap();
        assert_eq!(fr.into_data().unwrap(), "a");
        drop(f);
        // The retry sees everything, in order.
        let second = first.clone();
        let all = second.collect().await.unwrap().to_bytes();
        assert_eq!(all, "abc");
        assert!(first.is_replayable());
        let third = first.clone().collect().await.unwrap().to_bytes();
        assert_eq!(third, "abc");
    }

    #[tokio::test]
    async fn overflow_disables_replay_but_streams() {
        let b = ReplayBody::new(chunks(&["aaaa", "bbbb", "cccc"]), 6);
        let all = b.clone().collect().await.unwrap().to_bytes();
        assert_eq!(all, "aaaabbbbcccc");
        assert!(!b.is_replayable());
    }

    #[tokio::test]
    async fn trailers_are_replayed() {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BoxError>> =
            vec![Ok(Frame::data(Bytes::from_static(b"x"))), Ok(Frame::trailers(t))];
        let src = crate::body::boxed(StreamBody::new(futures_util::stream::iter(frames)));
        let b = ReplayBody::new(src, 100);
        let c1 = b.clone().collect().await.unwrap();
        assert_eq!(c1.trailers().unwrap()["grpc-status"], "0");
        let c2 = b.clone().collect().await.unwrap();
        assert_eq!(c2.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(c2.to_bytes(), "x");
    }
}

//! A 413 reaches the client. A handler that refuses a body over its route's limit stops
//! reading it; if the gateway then answered and closed, the rest of the body would still be
//! arriving, the kernel would reset the connection, and the client would see "connection
//! reset" instead of PAYLOAD_TOO_LARGE (seen under load in the body-limit tests). So every
//! request body is shared with this layer, and after a 413 it reads what is left, within
//! bounds, before the answer goes out; the connection then stays usable.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;

/// Past this many bytes left unread the connection is not worth keeping: answer and close.
const DRAIN_AT_MOST: u64 = 16 * 1024 * 1024;
/// A client that sends the rest slowly does not hold the answer longer than this.
const DRAIN_FOR_AT_MOST: Duration = Duration::from_secs(2);

pub async fn drain_refused_bodies(req: Request, next: Next) -> Response {
    // No route takes less than SMALL_BODY, so a body known to be no larger is never refused
    // for its size; most requests (every text send) skip the shared slot.
    let length = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if length.is_some_and(|n| n <= super::SMALL_BODY as u64) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let slot = Arc::new(Mutex::new(Some(body)));
    let req = Request::from_parts(parts, Body::new(SharedBody(slot.clone())));
    let response = next.run(req).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        let rest = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(rest) = rest {
            let _ = tokio::time::timeout(DRAIN_FOR_AT_MOST, discard(rest)).await;
        }
    }
    response
}

/// Reads and drops the rest of a body, at most `DRAIN_AT_MOST` bytes.
async fn discard(mut body: Body) {
    if body.size_hint().lower() > DRAIN_AT_MOST {
        return;
    }
    let mut seen: u64 = 0;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            seen = seen.saturating_add(data.len() as u64);
            if seen > DRAIN_AT_MOST {
                return;
            }
        }
    }
}

/// The request body, read through a slot this layer keeps a handle on.
struct SharedBody(Arc<Mutex<Option<Body>>>);

impl http_body::Body for SharedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match slot.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).as_ref().map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::post;
    use tower::ServiceExt;

    use super::*;

    /// Reads 4 bytes of the body, then refuses it.
    async fn refuse(req: Request) -> StatusCode {
        let mut body = req.into_body();
        let _ = body.frame().await;
        StatusCode::PAYLOAD_TOO_LARGE
    }

    fn chunked(chunks: usize) -> (Body, Arc<std::sync::atomic::AtomicUsize>) {
        let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = read.clone();
        let stream = futures::stream::iter((0..chunks).map(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from_static(b"abcd"))
        }));
        (Body::from_stream(stream), read)
    }

    /// Sends a body of 100 chunks to `handler` behind the layer: the answer's status, and how
    /// many chunks were read by the time it came.
    async fn through_the_layer<H: axum::handler::Handler<T, ()>, T: 'static>(handler: H) -> (StatusCode, usize) {
        let app = Router::new().route("/", post(handler)).layer(axum::middleware::from_fn(drain_refused_bodies));
        let (body, read) = chunked(100);
        let resp = app.oneshot(Request::post("/").body(body).unwrap()).await.unwrap();
        (resp.status(), read.load(std::sync::atomic::Ordering::SeqCst))
    }

    #[tokio::test]
    async fn the_rest_of_a_refused_body_is_read_before_the_answer() {
        assert_eq!(through_the_layer(refuse).await, (StatusCode::PAYLOAD_TOO_LARGE, 100), "every chunk was read");
    }

    #[tokio::test]
    async fn other_answers_leave_the_body_alone() {
        async fn ok(req: Request) -> StatusCode {
            let mut body = req.into_body();
            let _ = body.frame().await;
            StatusCode::OK
        }
        assert_eq!(through_the_layer(ok).await, (StatusCode::OK, 1), "only what the handler read");
    }

    #[tokio::test]
    async fn a_body_read_whole_by_the_handler_is_passed_through() {
        async fn echo(body: Bytes) -> Bytes {
            body
        }
        let app = Router::new().route("/", post(echo)).layer(axum::middleware::from_fn(drain_refused_bodies));
        let resp = app.oneshot(Request::post("/").body(Body::from("hello")).unwrap()).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), Bytes::from_static(b"hello"));
    }
}

//! gRPC call latency by method, measured by a tower layer around a tonic server (the
//! indexer's and the orchestrator's), so no handler has to time itself.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

type MethodLabel = [(&'static str, String); 1];

/// Where calls of methods the server does not have are counted, so a client sending
/// made-up paths cannot grow the number of series.
const UNKNOWN_METHOD: &str = "unknown";

/// gRPC's status code for a method the server does not implement.
const UNIMPLEMENTED: &[u8] = b"12";

fn latency_histogram() -> Histogram {
    // 100 µs to ~3.3 s.
    Histogram::new(exponential_buckets(1e-4, 2.0, 16))
}

/// Latency histograms of gRPC calls, by method (`/package.Service/Method`).
#[derive(Clone, Debug)]
pub struct GrpcLatency {
    by_method: Family<MethodLabel, Histogram, fn() -> Histogram>,
}

impl Default for GrpcLatency {
    fn default() -> Self {
        GrpcLatency {
            by_method: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl GrpcLatency {
    /// Adds the histograms to `registry` (as `<prefix>_grpc_request_duration_seconds`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "grpc_request_duration",
            "Time to answer a gRPC call, to its response headers (the whole call for unary \
             methods, opening the stream for streaming ones), by method",
            Unit::Seconds,
            self.by_method.clone(),
        );
    }

    /// The tower layer that times every call of a server.
    pub fn layer(&self) -> LatencyLayer {
        LatencyLayer(self.clone())
    }

    fn observe(&self, method: String, took: Duration) {
        self.by_method
            .get_or_create(&[("method", method)])
            .observe(took.as_secs_f64());
    }
}

/// Wraps a service in [`Timed`].
#[derive(Clone, Debug)]
pub struct LatencyLayer(GrpcLatency);

impl<S> tower_layer::Layer<S> for LatencyLayer {
    type Service = Timed<S>;

    fn layer(&self, inner: S) -> Timed<S> {
        Timed {
            inner,
            latency: self.0.clone(),
        }
    }
}

/// A service whose calls are timed into [`GrpcLatency`].
#[derive(Clone, Debug)]
pub struct Timed<S> {
    inner: S,
    latency: GrpcLatency,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for Timed<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let latency = self.latency.clone();
        let started = Instant::now();
        let answer = self.inner.call(req);
        Box::pin(async move {
            let answered = answer.await;
            let unknown = answered.as_ref().is_ok_and(|r| {
                r.headers()
                    .get("grpc-status")
                    .is_some_and(|s| s.as_bytes() == UNIMPLEMENTED)
            });
            let method = if unknown {
                UNKNOWN_METHOD.to_owned()
            } else {
                method
            };
            latency.observe(method, started.elapsed());
            answered
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower_layer::Layer;
    use tower_service::Service;

    /// A server that answers every path but `/known.Service/Call` as unimplemented.
    #[derive(Clone)]
    struct Fake;

    impl Service<http::Request<()>> for Fake {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<http::Response<()>, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<()>) -> Self::Future {
            let mut answer = http::Response::new(());
            if req.uri().path() != "/known.Service/Call" {
                answer
                    .headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("12"));
            }
            std::future::ready(Ok(answer))
        }
    }

    #[test]
    fn calls_are_counted_by_method_and_made_up_paths_share_one_series() {
        let latency = GrpcLatency::default();
        let mut service = latency.layer().layer(Fake);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for path in [
            "/known.Service/Call",
            "/known.Service/Call",
            "/made.Up/One",
            "/made.Up/Two",
        ] {
            let req = http::Request::builder().uri(path).body(()).unwrap();
            runtime.block_on(service.call(req)).unwrap();
        }
        let mut registry = Registry::default();
        latency.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let counts: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("grpc_request_duration_seconds_count"))
            .collect();
        assert_eq!(counts.len(), 2, "{text}");
        for method in ["/known.Service/Call", UNKNOWN_METHOD] {
            let line = format!("grpc_request_duration_seconds_count{{method=\"{method}\"}} 2");
            assert!(counts.contains(&line.as_str()), "{text}");
        }
    }
}

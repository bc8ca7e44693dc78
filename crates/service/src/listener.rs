//! Accepting gRPC connections from a listener the caller bound (port 0 in tests).

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;

/// The connections `listener` accepts, with Nagle's algorithm off. Serving from our own
/// listener skips tonic's `tcp_nodelay`, and a small answer then waited for the client's
/// delayed ACK: 40 ms for each call of a client that calls one at a time.
pub fn no_delay(
    listener: TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    use tokio_stream::StreamExt;
    TcpListenerStream::new(listener).map(|accepted| {
        if let Ok(stream) = &accepted {
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
        }
        accepted
    })
}

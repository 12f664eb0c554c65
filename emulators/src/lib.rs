//! Local stand-ins for the exporter's peers, used by the integration tests and runnable on
//! their own (`ecom-emulators --help`): a strict Cloudflare Workers KV emulator with fault
//! injection, an API keys service, and a Lambda runtime API to run the real binary against.

pub mod api_keys;
pub mod bench;
pub mod demo;
pub mod dynamo_proxy;
pub mod invoke_api;
pub mod kv;
pub mod poller;
pub mod runtime_api;
pub mod streams;

use std::net::SocketAddr;

use axum::Router;
use tokio::sync::oneshot;

/// Stops the server when dropped.
pub struct ServerHandle(Option<oneshot::Sender<()>>);

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(());
        }
    }
}

/// Serves `router` on `127.0.0.1:{port}` (0: a free port) in the background.
pub async fn serve(port: u16, router: Router) -> std::io::Result<(SocketAddr, ServerHandle)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    Ok((addr, ServerHandle(Some(stop))))
}

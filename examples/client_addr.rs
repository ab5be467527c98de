//! Who is calling: every request carries its connection's two ends, on TCP and unix listeners.
//!
//! ```sh
//! cargo run --example client_addr --features axum -- serve --listen 127.0.0.1:3000 \
//!     --listen unix:/tmp/client_addr.sock
//! curl 127.0.0.1:3000/                                  # tcp peer=127.0.0.1:41234 local=…
//! curl --unix-socket /tmp/client_addr.sock localhost/   # unix pid=… uid=… gid=… local=…
//! curl 127.0.0.1:3000/axum                              # axum peer=127.0.0.1:41236
//! ```
//!
//! `/` reads tine's own [`tine::ConnectInfo`] with axum's `Extension` extractor: no Cargo
//! feature needed. `/axum` uses axum's `ConnectInfo<SocketAddr>` extractor, as an app written
//! for `axum::serve(.., router.into_make_service_with_connect_info::<SocketAddr>())` does: tine
//! puts that type in TCP requests when built with its `axum` feature (the route exists only
//! then; on a unix listener the extractor fails with 500, as it does under `axum::serve`).

use axum::routing::get;
use axum::{Extension, Router};
use tine::{App, ConnectInfo, Context, Handler, Worker};

struct ClientAddr;

impl App for ClientAddr {
    fn preload(_ctx: &Context) -> anyhow::Result<Self> {
        Ok(ClientAddr)
    }

    fn boot(&self, _worker: &Worker) -> anyhow::Result<Handler> {
        let router = Router::new().route("/", get(tine_info));
        #[cfg(feature = "axum")]
        let router = router.route("/axum", get(axum_info));
        Ok(Handler::http(router))
    }
}

async fn tine_info(Extension(info): Extension<ConnectInfo>) -> String {
    match info {
        ConnectInfo::Tcp { peer, local } => format!("tcp peer={peer} local={local}\n"),
        ConnectInfo::Unix { peer, local } => {
            let local = local.map_or("-".into(), |p| p.display().to_string());
            match peer {
                Some(cred) => format!(
                    "unix pid={} uid={} gid={} local={local}\n",
                    cred.pid().unwrap_or(0),
                    cred.uid(),
                    cred.gid()
                ),
                None => format!("unix local={local}\n"),
            }
        }
        _ => "other\n".into(),
    }
}

#[cfg(feature = "axum")]
async fn axum_info(
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
) -> String {
    format!("axum peer={peer}\n")
}

fn main() -> std::process::ExitCode {
    tine::run::<ClientAddr>()
}

//! What a coordinator serves on its metrics and status port
//! (`distbuild_ops::http`): `/metrics`, Prometheus's text format; `/`,
//! the live status page (`page.html`, one file, nothing from elsewhere);
//! `/status.json`, its data (`status_page`).

use std::sync::Arc;

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use distbuild_ops::http::METRICS_CONTENT_TYPE;

use crate::replica::Node;

/// The page itself: static, it shows nothing until its script fetches
/// `/status.json` (with the token), so anyone may load it and be told how
/// to log in.
pub fn public_routes() -> Router {
    Router::new().route(
        "/",
        get(|| async {
            (
                [
                    (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                    // The page loads nothing from elsewhere; say so.
                    (
                        header::CONTENT_SECURITY_POLICY,
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
                    ),
                ],
                PAGE,
            )
        }),
    )
}

/// The routes behind the token (the token check and `/login` are added
/// by `HttpPort::serve`).
pub fn routes(node: Arc<Node>) -> Router {
    let page = Arc::new(super::status_page::StatusPage::new(node.clone()));
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let node = node.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
                        node.metrics_text(),
                    )
                        .into_response()
                }
            }),
        )
        .route(
            "/status.json",
            get(move || {
                let page = page.clone();
                async move {
                    (
                        [
                            (header::CONTENT_TYPE, "application/json"),
                            (header::CACHE_CONTROL, "no-store"),
                        ],
                        page.status().await.to_string(),
                    )
                }
            }),
        )
}

/// The status page.
const PAGE: &str = include_str!("page.html");

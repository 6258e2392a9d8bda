//! The operator console (DESIGN.md §6.4, docs/console.md): one page, its script and its style,
//! compiled into the binary so it works with no internet and nothing from a CDN. The page reads
//! the same admin API as curl does, with the admin token the operator pastes (kept in the tab's
//! session storage, sent as a bearer header); serving the assets needs no token.
//!
//! Every asset is sent with a strict Content-Security-Policy: scripts and styles only from this
//! origin, no inline script or style, requests only back to this origin, no framing.

use axum::Router;
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::AppState;
use super::routes;

const PAGE: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/app.css");

/// Only this origin, nothing inline, no plugins, no framing, no form posts elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            routes::CONSOLE.path,
            get(|| async { asset("text/html; charset=utf-8", PAGE) }),
        )
        .route(
            routes::CONSOLE_SCRIPT.path,
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            routes::CONSOLE_STYLE.path,
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        // The assets change with the binary: a browser asks again rather than keep an old copy.
        (header::CACHE_CONTROL, "no-cache"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ]
    .map(|(name, value)| (name, HeaderValue::from_static(value)));
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_only_its_own_assets_and_has_no_inline_script_or_style() {
        assert!(PAGE.contains(r#"<script src="/console/app.js" defer></script>"#));
        assert!(PAGE.contains(r#"<link rel="stylesheet" href="/console/app.css">"#));
        // One script element, and it has a src: nothing inline for the policy to refuse.
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert!(!PAGE.contains("<style"), "no inline style element");
        assert!(!PAGE.contains(" style="), "no style attributes");
        let handlers = PAGE.split(" on").skip(1).filter(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert_eq!(handlers.count(), 0, "no inline event handlers");
        for asset in [PAGE, SCRIPT, STYLE] {
            assert!(!asset.contains("http://") || asset.contains("http://www.w3.org/2000/svg"));
            assert!(!asset.contains("https://"), "nothing from another origin");
        }
    }

    #[test]
    fn the_token_is_kept_in_session_storage_only() {
        assert!(SCRIPT.contains("sessionStorage"));
        assert!(!SCRIPT.contains("localStorage"));
        assert!(!SCRIPT.contains("document.cookie"));
        assert!(
            !SCRIPT.contains("innerHTML"),
            "text is inserted as text, never as markup"
        );
    }
}

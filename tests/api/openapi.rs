//! The OpenAPI document: served at `/openapi.json`, generated from the route table, and
//! committed as `docs/openapi.json`. A route added to `src/http/routes.rs` makes this test fail
//! until the file is regenerated:
//! `UPDATE_OPENAPI=1 cargo nextest run -E 'test(/^openapi::/)'`.

use std::path::Path;

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn the_served_openapi_document_equals_the_committed_one_and_names_every_route() {
    let nats = NatsServer::start();
    let app = TestApp::spawn(&nats).await;
    let (status, served) = app.get("/openapi.json", None).await;
    assert_eq!(status.as_u16(), 200, "{served}");
    assert_eq!(served["openapi"], "3.1.0");
    for route in auto_com_center::http::routes::ALL.iter() {
        let method = route.method.as_str().to_ascii_lowercase();
        assert!(
            served["paths"][route.path][&method].is_object(),
            "{} {} is not in the document",
            route.method,
            route.path
        );
    }
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    let text = serde_json::to_string_pretty(&served).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&committed, &text).unwrap();
    }
    let on_disk: Value = serde_json::from_str(
        &std::fs::read_to_string(&committed).expect("docs/openapi.json exists"),
    )
    .unwrap();
    assert!(
        on_disk == served,
        "docs/openapi.json is out of date: regenerate it with \
         UPDATE_OPENAPI=1 cargo nextest run -E 'test(/^openapi::/)'"
    );
    app.stop().await;
}

//! The admin API (SPEC §2.3): bearer-token roles and the cash-out list (newest first,
//! cursor-paginated, filtered by provider and status).

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{
    assert_accepted, fiserv_headers, now_unix, simpay_body, simpay_headers, spawn_app, FiservBody,
    TestApp, ADMIN_TOKEN, FISERV_SECRET, REPORTS_TOKEN, SIMPAY_SECRET,
};

/// Five Fiserv cash-outs created a minute apart (oldest first) and their canonical states.
const FISERV_CASHOUTS: [(&str, u8, &str, &str); 5] = [
    ("7300001", 3, "2026-11-20T10:00:00Z", "completed"),
    ("7300002", 2, "2026-11-20T10:01:00Z", "processing"),
    ("7300003", 3, "2026-11-20T10:02:00Z", "completed"),
    ("7300004", 5, "2026-11-20T10:03:00Z", "expired"),
    ("7300005", 3, "2026-11-20T10:04:00Z", "completed"),
];

/// Seeds the five Fiserv cash-outs plus one SimPay cash-out.
async fn seed(app: &TestApp) {
    for (reference, status, created_at, _) in FISERV_CASHOUTS {
        let body = FiservBody::new(reference, status)
            .created_at(created_at)
            .bytes();
        let headers = fiserv_headers(
            &body,
            "/webhooks/fiserv",
            FISERV_SECRET,
            now_unix(),
            &format!("req-{reference}"),
        );
        assert_accepted(
            &app.post_webhook("fiserv", &headers, &body).await,
            reference,
        );
    }
    let body = simpay_body("PIX_CASHOUT_SUCCESS", "7300100", Some("SUCCESS"), "5.00");
    assert_accepted(
        &app.post_webhook("simpay", &simpay_headers(&body, SIMPAY_SECRET), &body)
            .await,
        "simpay",
    );
    app.wait_for_cashout("simpay", "7300100", Duration::from_secs(10), |c| {
        c["status"] == "completed"
    })
    .await;
}

fn references(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap_or_else(|| panic!("a list answers items: {page}"))
        .iter()
        .map(|item| {
            item["provider_ref"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

#[tokio::test]
async fn admin_endpoints_need_an_admin_token() {
    // Arrange
    let app = spawn_app().await;
    let cases: [(&str, Option<String>, u16, &str); 6] = [
        ("no Authorization header", None, 401, "unauthorized"),
        (
            "a wrong token",
            Some("Bearer not-a-token".to_string()),
            401,
            "unauthorized",
        ),
        (
            "an empty bearer token",
            Some("Bearer ".to_string()),
            401,
            "unauthorized",
        ),
        (
            "the admin token under another scheme",
            Some(format!("Basic {ADMIN_TOKEN}")),
            401,
            "unauthorized",
        ),
        (
            "the reports token",
            Some(format!("Bearer {REPORTS_TOKEN}")),
            403,
            "forbidden",
        ),
        (
            "the admin token",
            Some(format!("Bearer {ADMIN_TOKEN}")),
            200,
            "",
        ),
    ];
    for (case, authorization, expected, code) in cases {
        // Act
        let mut request = app.client.get(format!("{}/api/v1/cashouts", app.address));
        if let Some(value) = &authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.expect("GET /api/v1/cashouts");

        // Assert
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("JSON body");
        assert_eq!(status, expected, "{case}: {body}");
        if !code.is_empty() {
            assert_eq!(body["code"], code, "{case}: {body}");
        }
    }
    app.stop().await;
}

#[tokio::test]
async fn reports_token_is_forbidden_on_every_admin_endpoint() {
    // Arrange
    let app = spawn_app().await;
    let gets = [
        "/api/v1/cashouts",
        "/api/v1/cashouts/fiserv/7300001",
        "/api/v1/mismatches",
        "/api/v1/alerts",
    ];

    for path in gets {
        // Act
        let (status, body) = app.get_with_token(path, Some(REPORTS_TOKEN)).await;

        // Assert
        assert_eq!(
            (status, body["code"].clone()),
            (403, Value::from("forbidden")),
            "GET {path}: {body}"
        );
    }
    let (status, body) = app
        .post_with_token("/api/v1/events/any/reprocess", Some(REPORTS_TOKEN))
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, Value::from("forbidden")),
        "POST reprocess: {body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn cashout_list_is_newest_first_and_cursor_paginated() {
    // Arrange
    let app = spawn_app().await;
    seed(&app).await;

    // Act: walk the pages of two.
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(cursor) => format!("/api/v1/cashouts?provider=fiserv&limit=2&cursor={cursor}"),
            None => "/api/v1/cashouts?provider=fiserv&limit=2".to_string(),
        };
        let (status, page) = app.get_with_token(&path, Some(ADMIN_TOKEN)).await;
        assert_eq!(status, 200, "{path}: {page}");
        pages.push(references(&page));
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => {
                assert_eq!(
                    page["next_cursor"],
                    Value::Null,
                    "the last page says so: {page}"
                );
                break;
            }
        }
        assert!(
            pages.len() <= 3,
            "five items in pages of two end on the third page: {pages:?}"
        );
    }

    // Assert
    assert_eq!(
        pages,
        vec![
            vec!["7300005", "7300004"],
            vec!["7300003", "7300002"],
            vec!["7300001"]
        ]
    );
    app.stop().await;
}

#[tokio::test]
async fn cashout_list_items_have_the_cashout_shape() {
    // Arrange
    let app = spawn_app().await;
    seed(&app).await;

    // Act
    let (status, page) = app
        .get_with_token(
            "/api/v1/cashouts?provider=fiserv&limit=1",
            Some(ADMIN_TOKEN),
        )
        .await;

    // Assert
    assert_eq!(status, 200, "{page}");
    let item = &page["items"][0];
    assert_eq!(item["provider"], "fiserv");
    assert_eq!(item["provider_ref"], "7300005");
    assert_eq!(item["status"], "completed");
    assert_eq!(item["provider_status"], "3");
    assert_eq!(item["amount"], "1234567.89");
    assert_eq!(item["currency"], "BRL");
    assert_eq!(item["held"], false);
    assert_eq!(
        item["created_at"], "2026-11-20T10:04:00Z",
        "the provider's creation time: {item}"
    );
    assert!(
        item.get("events").is_none(),
        "only the single view carries events: {item}"
    );
    app.stop().await;
}

#[tokio::test]
async fn cashout_list_filters_by_provider_and_status() {
    // Arrange
    let app = spawn_app().await;
    seed(&app).await;
    let cases: [(&str, &[&str]); 6] = [
        ("provider=simpay", &["7300100"]),
        (
            "provider=fiserv&status=completed",
            &["7300005", "7300003", "7300001"],
        ),
        ("provider=fiserv&status=expired", &["7300004"]),
        ("provider=fiserv&status=failed", &[]),
        ("provider=nobody", &[]),
        (
            "provider=fiserv&from=2026-11-20T10:02:00Z&to=2026-11-20T10:04:00Z",
            &["7300004", "7300003"],
        ),
    ];
    for (query, expected) in cases {
        // Act
        let (status, page) = app
            .get_with_token(&format!("/api/v1/cashouts?{query}"), Some(ADMIN_TOKEN))
            .await;

        // Assert
        assert_eq!(status, 200, "{query}: {page}");
        assert_eq!(references(&page), expected, "{query}: {page}");
        assert_eq!(
            page["next_cursor"],
            Value::Null,
            "{query}: everything fits one page"
        );
    }
    let (_, page) = app
        .get_with_token("/api/v1/cashouts?status=completed", Some(ADMIN_TOKEN))
        .await;
    let providers: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["provider"].as_str())
        .collect();
    assert!(
        providers.contains(&"simpay") && providers.contains(&"fiserv"),
        "a status filter spans providers: {page}"
    );
    assert!(
        page["items"]
            .as_array()
            .expect("items")
            .iter()
            .all(|i| i["status"] == "completed"),
        "only completed cash-outs: {page}"
    );
    app.stop().await;
}

#[tokio::test]
async fn cashout_list_rejects_invalid_queries_with_400() {
    // Arrange
    let app = spawn_app().await;
    let cases = [
        ("status=done", "a status that is not canonical"),
        ("limit=0", "a limit below 1"),
        ("limit=1001", "a limit above 1000"),
        ("limit=two", "a limit that is not a number"),
        ("cursor=not-a-cursor!", "a cursor this API did not give"),
        ("from=yesterday", "a from that is not a date"),
    ];
    for (query, case) in cases {
        // Act
        let (status, body) = app
            .get_with_token(&format!("/api/v1/cashouts?{query}"), Some(ADMIN_TOKEN))
            .await;

        // Assert
        assert_eq!(status, 400, "{case} ({query}): {body}");
        assert_eq!(
            body["code"], "bad_request",
            "{case} ({query}): errors are JSON with a code: {body}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_cashout_is_answered_404() {
    // Arrange
    let app = spawn_app().await;

    // Act
    let (status, body) = app.get_cashout("fiserv", "no-such-ref").await;

    // Assert
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "not_found", "{body}");
    app.stop().await;
}

#[tokio::test]
async fn a_json_body_without_its_content_type_is_a_400_naming_the_header() {
    // Review finding: the answer was actix's bare "Content type error".
    let app = spawn_app().await;
    let response = app
        .client
        .post(format!("{}/api/v1/ledger", app.address))
        .bearer_auth(ADMIN_TOKEN)
        .body(r#"{"provider":"fiserv","external_id":"ord-ct","amount":"1.00","currency":"BRL"}"#)
        .send()
        .await
        .expect("POST request");
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.expect("a JSON error");
    assert_eq!(body["code"], "bad_request", "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("Content-Type") && error.contains("application/json"),
        "names the header and the type expected: {body}"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_bearer_scheme_name_is_case_insensitive() {
    // RFC 9110 §11.1: an auth-scheme is matched without regard to case.
    let app = spawn_app().await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        // Act
        let response = app
            .client
            .get(format!("{}/api/v1/cashouts", app.address))
            .header("Authorization", format!("{scheme} {ADMIN_TOKEN}"))
            .send()
            .await
            .expect("GET request");

        // Assert
        assert_eq!(response.status().as_u16(), 200, "{scheme}");
    }
    // The token itself is still compared exactly.
    let response = app
        .client
        .get(format!("{}/api/v1/cashouts", app.address))
        .header(
            "Authorization",
            format!("bearer {}", ADMIN_TOKEN.to_uppercase()),
        )
        .send()
        .await
        .expect("GET request");
    assert_eq!(response.status().as_u16(), 401);
    app.stop().await;
}

//! Robustness of every provider parser against arbitrary and mutated input: no panic,
//! bounded time, and errors that stay short and free of control characters (they become
//! quarantine reasons, log lines and alert text).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{fiserv_pix, mannco, pismo, simpay, tupay, ParseError, ProviderKind};
use crate::verify::{InboundRequest, RequestHeaders};

/// Inputs tried per parser.
const CASES: usize = 1_500;

/// Genuine inputs of each shape, to mutate.
const SEEDS: [&[u8]; 8] = [
    include_bytes!("../../fixtures/webhooks/fiserv_pix/failed.json"),
    include_bytes!("../../fixtures/webhooks/fiserv_pix/confirmed.json"),
    include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_ERROR.json"),
    include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_SUCCESS.json"),
    include_bytes!("../../fixtures/webhooks/pismo/settled.json"),
    include_bytes!("../../fixtures/webhooks/tupay/notification.txt"),
    br#"{"items":[{"cashout_id":"1","cashout_status":3,"rejection_code":"826","amount":"1.00","currency":"PEN"}],"page":0,"rows":1,"maxRows":50,"data":[]}"#,
    br#"{"err":false,"success":true,"content":{"items":[{"cashoutId":7,"amount":1000,"fee":20,"netAmount":980,"method":"payoneer","status":"completed","createdAt":"2026-11-20T12:00:00Z","updatedAt":"2026-11-20T12:00:00Z"}],"page":1,"totalPages":1}}"#,
];

/// Bytes that make parsers work: JSON and form syntax, escapes, digits, odd characters.
const INTERESTING: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b"null",
    b"1e400",
    b"-1",
    b"99999999999999999999",
    b"\\u0000",
    b"\\ud800",
    b"%FF%FE",
    b"&",
    b"=",
    b"..",
    b"/",
    b"\xe2\x80\xae",
    b"\x00",
    b"\r\n",
];

/// A mutation of a random seed, or plain random bytes.
fn input(rng: &mut StdRng) -> Vec<u8> {
    if rng.random_bool(0.15) {
        let len = rng.random_range(0..256);
        return (0..len).map(|_| rng.random()).collect();
    }
    let mut bytes = SEEDS[rng.random_range(0..SEEDS.len())].to_vec();
    for _ in 0..rng.random_range(1..6) {
        let at = rng.random_range(0..=bytes.len());
        match rng.random_range(0..5) {
            0 => bytes.truncate(at),
            1 if at < bytes.len() => bytes[at] = rng.random(),
            2 => {
                let piece = INTERESTING[rng.random_range(0..INTERESTING.len())];
                bytes.splice(at..at, piece.iter().copied());
            }
            3 => {
                // A long run: deep or huge values.
                let piece = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let run: Vec<u8> = piece
                    .iter()
                    .copied()
                    .cycle()
                    .take(rng.random_range(1..4_000))
                    .collect();
                bytes.splice(at..at, run);
            }
            _ => {
                let end = rng.random_range(at..=bytes.len());
                bytes.drain(at..end);
            }
        }
    }
    bytes
}

/// Checks an error is short and clean; says whether the input was accepted.
#[track_caller]
fn assert_bounded(result: Result<impl Sized, ParseError>, input: &[u8]) -> bool {
    if let Err(err) = &result {
        assert!(
            err.0.chars().count() <= 300,
            "a {}-character error for {:?}",
            err.0.len(),
            String::from_utf8_lossy(&input[..input.len().min(200)])
        );
        assert!(
            !err.0.chars().any(char::is_control),
            "a control character in {:?}",
            err.0
        );
    }
    result.is_ok()
}

#[test]
fn every_parser_takes_arbitrary_bytes_without_panic_with_short_clean_errors() {
    let mut rng = StdRng::seed_from_u64(9);
    let headers = RequestHeaders::from([("content-type", "application/json")]);
    let started = Instant::now();
    let mut accepted = 0;
    for _ in 0..CASES {
        let bytes = input(&mut rng);
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: &bytes,
        };
        for kind in ProviderKind::ALL {
            let adapter = kind.adapter();
            let parsed = adapter
                .parse_webhook(&request)
                .and_then(|o| o.check_ids(kind).map(|()| o));
            accepted += usize::from(assert_bounded(parsed, &bytes));
            if let Some(peeked) = adapter.peek_provider_ref(&request) {
                assert!(
                    crate::ids::validate_id("peeked", &peeked).is_ok(),
                    "{peeked:?}"
                );
            }
            let _ = adapter.body_event_id(&request);
        }
        assert_bounded(fiserv_pix::parse_search_page(&bytes), &bytes);
        assert_bounded(mannco::parse_history_page(&bytes), &bytes);
        assert_bounded(tupay::parse_search_page(&bytes), &bytes);
        assert_bounded(tupay::observation_from_search_item(&bytes), &bytes);
        assert_bounded(simpay::observation_from_status_answer(&bytes), &bytes);
        assert_bounded(pismo::observation_from_status_answer(&bytes), &bytes);
        assert_bounded(tupay::observation_from_status_answer("1", &bytes), &bytes);
    }
    // The mutations explore both sides: some inputs still parse, most do not.
    assert!(
        accepted > CASES / 20 && accepted < CASES * 5,
        "{accepted} accepted"
    );
    // Bounded time: a generous ceiling for a debug build on a busy machine.
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{CASES} inputs took {:?}",
        started.elapsed()
    );
}

//! Property tests (proptest) of every provider parser against arbitrary and mutated input:
//! no panic, bounded time per input, and errors that stay short and free of control
//! characters (they become quarantine reasons, log lines and alert text).

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;

use super::{fiserv_pix, mannco, pismo, simpay, tupay, ParseError, ProviderKind};
use crate::verify::{InboundRequest, RequestHeaders};

/// Inputs tried (each against every parser).
const CASES: u32 = 1_000;
/// Most time all parsers together may take on one input: generous for a debug build on
/// a busy 2-core machine, and still far below what anything quadratic in the ~10 KB
/// inputs tried would take.
const PER_INPUT: Duration = Duration::from_millis(if cfg!(debug_assertions) { 250 } else { 50 });

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

/// One edit of a seed.
#[derive(Debug, Clone)]
enum Edit {
    Truncate(Index),
    Replace(Index, u8),
    Insert(Index, Index),
    /// A long run of one piece: deep or huge values.
    Run(Index, Index, usize),
    Delete(Index, Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Edit::Replace(at, byte)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, piece)| Edit::Insert(at, piece)),
        (any::<Index>(), any::<Index>(), 1usize..4_000)
            .prop_map(|(at, piece, n)| Edit::Run(at, piece, n)),
        (any::<Index>(), any::<Index>()).prop_map(|(at, end)| Edit::Delete(at, end)),
    ]
}

/// A mutation of a genuine seed, or plain arbitrary bytes.
fn input() -> impl Strategy<Value = Vec<u8>> {
    let mutated =
        (any::<Index>(), prop::collection::vec(edit(), 1..6)).prop_map(|(seed, edits)| {
            let mut bytes = SEEDS[seed.index(SEEDS.len())].to_vec();
            for edit in edits {
                let at = |index: &Index, bytes: &Vec<u8>| index.index(bytes.len() + 1);
                match edit {
                    Edit::Truncate(i) => {
                        let at = at(&i, &bytes);
                        bytes.truncate(at);
                    }
                    Edit::Replace(i, byte) => {
                        let at = at(&i, &bytes);
                        if let Some(b) = bytes.get_mut(at) {
                            *b = byte;
                        }
                    }
                    Edit::Insert(i, piece) => {
                        let at = at(&i, &bytes);
                        let piece = INTERESTING[piece.index(INTERESTING.len())];
                        bytes.splice(at..at, piece.iter().copied());
                    }
                    Edit::Run(i, piece, n) => {
                        let at = at(&i, &bytes);
                        let piece = INTERESTING[piece.index(INTERESTING.len())];
                        let run: Vec<u8> = piece.iter().copied().cycle().take(n).collect();
                        bytes.splice(at..at, run);
                    }
                    Edit::Delete(i, end) => {
                        let at = at(&i, &bytes);
                        let end = at + end.index(bytes.len() - at + 1);
                        bytes.drain(at..end);
                    }
                }
            }
            bytes
        });
    prop_oneof![
        17 => mutated,
        3 => prop::collection::vec(any::<u8>(), 0..256),
    ]
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

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn every_parser_takes_arbitrary_bytes_without_panic_in_bounded_time_with_short_clean_errors(
        bytes in input(),
        content_type in prop_oneof![
            Just("application/json".to_string()),
            Just("application/x-www-form-urlencoded".to_string()),
            ".{0,40}",
        ],
    ) {
        let headers = RequestHeaders::from([("content-type", content_type.as_str())]);
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: &bytes,
        };
        let started = Instant::now();
        for kind in ProviderKind::ALL {
            let adapter = kind.adapter();
            let parsed = adapter
                .parse_webhook(&request)
                .and_then(|o| o.check_ids(kind).map(|()| o));
            assert_bounded(parsed, &bytes);
            if let Some(peeked) = adapter.peek_provider_ref(&request) {
                prop_assert!(
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
        let took = started.elapsed();
        prop_assert!(took < PER_INPUT, "{took:?} for {} bytes", bytes.len());
    }
}

#[test]
fn every_seed_the_properties_mutate_parses_somewhere() {
    // Without this the property above could pass on inputs every parser refuses at once.
    let headers = RequestHeaders::from([("content-type", "application/json")]);
    for seed in SEEDS {
        let request = InboundRequest {
            path: "/webhooks/x",
            headers: &headers,
            body: seed,
        };
        let webhook = ProviderKind::ALL
            .into_iter()
            .any(|kind| kind.adapter().parse_webhook(&request).is_ok());
        let page = fiserv_pix::parse_search_page(seed).is_ok()
            || mannco::parse_history_page(seed).is_ok()
            || tupay::parse_search_page(seed).is_ok()
            || simpay::observation_from_status_answer(seed).is_ok()
            || pismo::observation_from_status_answer(seed).is_ok();
        assert!(
            webhook || page,
            "no parser takes seed {}",
            String::from_utf8_lossy(seed)
        );
    }
}

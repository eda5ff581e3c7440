//! Tests of the simulators: API auth, signed webhooks the crate's verifiers accept, fault rates, truth vs API.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use chrono::Utc;
use wiremock::matchers::any;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use super::*;
use crate::config::{ProviderSettings, Settings};
use crate::providers::Observation;
use crate::verify::hmac::{fiserv_default, sign};
use crate::verify::{InboundRequest, RequestHeaders, Verifier};

const WEBHOOK_KINDS: [ProviderKind; 4] = [
    ProviderKind::FiservPix,
    ProviderKind::Simpay,
    ProviderKind::Tupay,
    ProviderKind::Pismo,
];

/// The daemon's view of a simulator: its provider block parsed by the real config loader
/// with the simulator's environment.
fn daemon_settings(sim: &Simulator) -> ProviderSettings {
    let env: BTreeMap<String, String> = sim.env_vars("SIMT").into_iter().collect();
    let toml = sim.provider_toml("simt", "SIMT");
    let settings = Settings::parse(&toml, Path::new("."), &env)
        .unwrap_or_else(|err| panic!("{} block rejected: {err}\n{toml}", sim.kind()));
    settings.providers.into_iter().next().unwrap()
}

fn env(sim: &Simulator, name: &str) -> String {
    let wanted = format!("SIMT_{name}");
    sim.env_vars("SIMT")
        .into_iter()
        .find(|(n, _)| *n == wanted)
        .map(|(_, value)| value)
        .unwrap_or_else(|| panic!("no {wanted}"))
}

fn headers_of(request: &Request) -> RequestHeaders {
    let mut headers = RequestHeaders::new();
    for (name, value) in request.headers.iter() {
        headers.insert(name.as_str(), value.to_str().unwrap());
    }
    headers
}

fn path_of(request: &Request) -> String {
    match request.url.query() {
        Some(query) => format!("{}?{query}", request.url.path()),
        None => request.url.path().to_string(),
    }
}

/// Answers as the daemon would: 200 when the crate's verifier accepts, else 401.
struct Verifying(Verifier);

impl Respond for Verifying {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let headers = headers_of(request);
        let path = path_of(request);
        let inbound = InboundRequest {
            path: &path,
            headers: &headers,
            body: &request.body,
        };
        match self.0.verify(&inbound, Utc::now().timestamp()) {
            Ok(_) => ResponseTemplate::new(200),
            Err(_) => ResponseTemplate::new(401),
        }
    }
}

/// A simulator of `kind` whose webhooks go to a stand-in daemon that verifies them.
struct Rig {
    sim: Simulator,
    daemon: MockServer,
}

impl Rig {
    async fn start(kind: ProviderKind, seed: u64, faults: Faults) -> Rig {
        let daemon = MockServer::start().await;
        let config = SimConfig {
            faults,
            webhook_target: Some(format!("{}/webhooks/simt", daemon.uri())),
            ..SimConfig::new(kind, seed)
        };
        let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
        if let Some(verifier) = daemon_settings(&sim).build_verifier().unwrap() {
            Mock::given(any())
                .respond_with(Verifying(verifier))
                .mount(&daemon)
                .await;
        }
        Rig { sim, daemon }
    }

    /// Requests the daemon received, with whether it accepted them.
    async fn received(&self) -> Vec<(Request, bool)> {
        let verifier = daemon_settings(&self.sim)
            .build_verifier()
            .unwrap()
            .unwrap();
        self.daemon
            .received_requests()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|request| {
                let headers = headers_of(&request);
                let path = path_of(&request);
                let accepted = verifier
                    .verify(
                        &InboundRequest {
                            path: &path,
                            headers: &headers,
                            body: &request.body,
                        },
                        Utc::now().timestamp(),
                    )
                    .is_ok();
                (request, accepted)
            })
            .collect()
    }
}

fn parse_webhook(kind: ProviderKind, request: &Request) -> Observation {
    let headers = headers_of(request);
    let path = path_of(request);
    kind.adapter()
        .parse_webhook(&InboundRequest {
            path: &path,
            headers: &headers,
            body: &request.body,
        })
        .unwrap_or_else(|err| {
            panic!(
                "{kind} webhook does not parse: {err}: {}",
                String::from_utf8_lossy(&request.body)
            )
        })
}

/// The state each cash-out reaches from the accepted webhooks, by the transition rule.
fn states_from_webhooks(
    kind: ProviderKind,
    received: &[(Request, bool)],
) -> HashMap<String, CurrentState> {
    let mut states: HashMap<String, CurrentState> = HashMap::new();
    for (request, accepted) in received {
        if !accepted {
            continue;
        }
        let observation = parse_webhook(kind, request);
        if let Some(update) = observation.status {
            let current = states.get(&observation.provider_ref).copied();
            states.insert(observation.provider_ref, decide(current, update).next);
        }
    }
    states
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_prints_a_provider_block_the_config_loader_accepts() {
    for kind in simulated_kinds() {
        let config = SimConfig {
            webhook_target: Some("http://127.0.0.1:9/webhooks/simt".to_string()),
            ..SimConfig::new(kind, 7)
        };
        let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
        let settings = daemon_settings(&sim);
        assert_eq!(settings.kind, kind);
        assert_eq!(
            settings.base_url.as_str().trim_end_matches('/'),
            sim.base_url()
        );
        assert_eq!(
            settings.missing_outbound_credentials(),
            None,
            "{kind}: the poller must be on"
        );
        let verifier = settings.build_verifier().unwrap();
        assert_eq!(verifier.is_some(), kind != ProviderKind::Mannco, "{kind}");
        let toml = sim.provider_toml("simt", "SIMT");
        for (name, _) in sim.env_vars("SIMT") {
            assert!(
                toml.contains(&name),
                "{kind}: {name} is not named in\n{toml}"
            );
        }
        sim.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cash_outs_are_deterministic_from_the_seed() {
    let run = |seed: u64| async move {
        let sim = Simulator::start(SimConfig::new(ProviderKind::Tupay, seed), "127.0.0.1:0")
            .await
            .unwrap();
        let refs = sim.create_cashouts(30);
        sim.run_to_completion().await;
        let truth = sim.ground_truth();
        sim.stop().await;
        (refs, truth)
    };
    let (refs, truth) = run(42).await;
    let (same_refs, same_truth) = run(42).await;
    let (other_refs, _) = run(43).await;
    assert_eq!(refs, same_refs);
    assert_eq!(truth, same_truth);
    assert_ne!(refs, other_refs);
    assert_eq!(truth[0].ledger_external_id, "ext-tupay-1");
    assert_eq!(truth[29].external_id.as_deref(), Some("ext-tupay-30"));
    assert!(truth.iter().all(|t| t.status.is_terminal()));
    let statuses: std::collections::HashSet<_> = truth.iter().map(|t| t.status).collect();
    assert!(statuses.len() >= 3, "paths are varied: {statuses:?}");
}

/// A change to the values a Fiserv request is signed with.
type Tweak = Box<dyn FnOnce(&mut BTreeMap<&'static str, String>)>;

/// Signs a Fiserv API GET as the daemon does.
fn fiserv_get(
    sim: &Simulator,
    path_and_query: &str,
    tweak: impl FnOnce(&mut BTreeMap<&'static str, String>),
) -> reqwest::RequestBuilder {
    let mut values: BTreeMap<&'static str, String> = BTreeMap::from([
        ("apikey", env(sim, "API_KEY")),
        ("secret", env(sim, "API_SECRET")),
        ("timestamp", Utc::now().timestamp().to_string()),
        ("request_id", "req-1".to_string()),
        ("bearer", env(sim, "BEARER_TOKEN")),
    ]);
    tweak(&mut values);
    let mut signed = RequestHeaders::new();
    signed.insert("apikey", &values["apikey"]);
    signed.insert("x-timestamp", &values["timestamp"]);
    let signature = sign(
        &fiserv_default(None, 300),
        values["secret"].as_bytes(),
        &InboundRequest {
            path: path_and_query,
            headers: &signed,
            body: b"",
        },
    )
    .unwrap();
    let mut request = client()
        .get(format!("{}{path_and_query}", sim.base_url()))
        .header("apikey", &values["apikey"])
        .header("x-timestamp", &values["timestamp"])
        .header("x-hmac-signature", signature)
        .header("authorization", format!("Bearer {}", values["bearer"]));
    if !values["request_id"].is_empty() {
        request = request.header("x-request-id", &values["request_id"]);
    }
    request
}

/// Checks that a polled observation says what the truth says.
fn assert_matches_truth(truth: &Truth, observation: &Observation) {
    let update = observation.status.expect("a polled item has a state");
    let reported = if truth.status == CashoutStatus::Reversed && update.reverses_completed {
        CashoutStatus::Reversed
    } else {
        update.status
    };
    assert_eq!(reported, truth.status, "{}", truth.provider_ref);
    assert_eq!(update.held, truth.held, "{}", truth.provider_ref);
    let amount = observation.amount.expect("a polled item has an amount");
    assert_eq!(amount.minor, truth.amount_minor, "{}", truth.provider_ref);
    assert_eq!(
        amount.currency.code(),
        truth.currency,
        "{}",
        truth.provider_ref
    );
    if truth.fee_minor.is_some() {
        assert_eq!(
            observation.fee_minor, truth.fee_minor,
            "{}",
            truth.provider_ref
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fiserv_api_checks_request_signing_and_matches_the_truth() {
    let sim = Simulator::start(SimConfig::new(ProviderKind::FiservPix, 3), "127.0.0.1:0")
        .await
        .unwrap();
    sim.create_cashouts(60);
    sim.run_to_completion().await;
    let search =
        "/v2/apm/pix/cashout?from=2000-01-01T00:00:00Z&to=2100-01-01T00:00:00Z&page=1&pageSize=50";

    let refused: [(&str, Tweak); 5] = [
        (
            "wrong apikey",
            Box::new(|v| {
                v.insert("apikey", "nope".into());
            }),
        ),
        (
            "wrong secret",
            Box::new(|v| {
                v.insert("secret", "nope".into());
            }),
        ),
        (
            "stale timestamp",
            Box::new(|v| {
                v.insert("timestamp", (Utc::now().timestamp() - 301).to_string());
            }),
        ),
        (
            "no request id",
            Box::new(|v| {
                v.insert("request_id", String::new());
            }),
        ),
        (
            "wrong bearer",
            Box::new(|v| {
                v.insert("bearer", "nope".into());
            }),
        ),
    ];
    for (why, tweak) in refused {
        let response = fiserv_get(&sim, search, tweak).send().await.unwrap();
        assert_eq!(response.status(), 401, "{why}");
    }
    assert_eq!(sim.stats().api_auth_failures, 5);

    let truth: HashMap<String, Truth> = sim
        .ground_truth()
        .into_iter()
        .map(|t| (t.provider_ref.clone(), t))
        .collect();
    let mut seen = 0;
    for page in 1..=2 {
        let path = search.replace("page=1", &format!("page={page}"));
        let response = fiserv_get(&sim, &path, |_| {}).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let parsed =
            crate::providers::fiserv_pix::parse_search_page(&response.bytes().await.unwrap())
                .unwrap();
        assert_eq!(parsed.is_last, page == 2);
        for item in parsed.items {
            let observation = item.unwrap();
            assert_matches_truth(&truth[&observation.provider_ref], &observation);
            seen += 1;
        }
    }
    assert_eq!(seen, 60);

    let some_ref = truth.keys().next().unwrap().clone();
    let response = fiserv_get(&sim, &format!("/v2/apm/pix/cashout/{some_ref}"), |_| {})
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let observation =
        crate::providers::fiserv_pix::observation_from_json(&response.bytes().await.unwrap())
            .unwrap();
    assert_matches_truth(&truth[&some_ref], &observation);
    let unknown = fiserv_get(&sim, "/v2/apm/pix/cashout/nope", |_| {})
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let empty_window = "/v2/apm/pix/cashout?from=2000-01-01T00:00:00Z&to=2000-01-02T00:00:00Z";
    let response = fiserv_get(&sim, empty_window, |_| {}).send().await.unwrap();
    let parsed =
        crate::providers::fiserv_pix::parse_search_page(&response.bytes().await.unwrap()).unwrap();
    assert!(parsed.items.is_empty() && parsed.is_last);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simpay_api_issues_tokens_for_good_clients_and_matches_the_truth() {
    let sim = Simulator::start(SimConfig::new(ProviderKind::Simpay, 5), "127.0.0.1:0")
        .await
        .unwrap();
    let refs = sim.create_cashouts(25);
    sim.run_to_completion().await;
    let http = client();
    let token_url = format!("{}/v2/oauth/token", sim.base_url());
    let form = |secret: String| {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", env(&sim, "CLIENT_ID")),
            ("client_secret", secret),
        ]
    };
    let refused = http
        .post(&token_url)
        .form(&form("nope".into()))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let answer: serde_json::Value = http
        .post(&token_url)
        .form(&form(env(&sim, "CLIENT_SECRET")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["expires_in"], 3600);
    let token = answer["access_token"].as_str().unwrap().to_string();

    let status_url = |id: &str| format!("{}/v2/finance/status-cashout/?id={id}", sim.base_url());
    let no_token = http.get(status_url(&refs[0])).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    for truth in sim.ground_truth() {
        let response = http
            .get(status_url(&truth.provider_ref))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let observation = crate::providers::simpay::observation_from_status_answer(
            &response.bytes().await.unwrap(),
        )
        .unwrap();
        assert_eq!(observation.external_id, truth.external_id);
        assert_matches_truth(&truth, &observation);
    }
    let unknown = http
        .get(status_url("1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    sim.revoke_tokens();
    let revoked = http
        .get(status_url(&refs[0]))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 401);
    assert_eq!(sim.stats().api_auth_failures, 3);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tupay_api_checks_payload_signature_and_login_and_matches_the_truth() {
    let sim = Simulator::start(SimConfig::new(ProviderKind::Tupay, 11), "127.0.0.1:0")
        .await
        .unwrap();
    sim.create_cashouts(60);
    sim.run_to_completion().await;
    let http = client();
    let status = |login: String, secret: String, cashout_id: &str| {
        let body = serde_json::json!({
            "login": login, "pass": env(&sim, "PASS"), "cashout_id": cashout_id,
        })
        .to_string();
        let signature = hex::encode(crate::verify::hmac::hmac_bytes(
            crate::verify::hmac::HmacAlgorithm::Sha256,
            secret.as_bytes(),
            &[body.as_bytes()],
        ));
        http.post(format!("{}/v3/cashout/status", sim.base_url()))
            .header("content-type", "application/json")
            .header("Payload-Signature", signature)
            .body(body)
    };
    let truth = sim.ground_truth();
    let first = &truth[0].provider_ref;
    let bad_signature = status(env(&sim, "LOGIN"), "nope".into(), first)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_signature.status(), 401);
    let bad_login = status("nope".into(), env(&sim, "API_SIGNATURE"), first)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_login.status(), 401);
    for expected in &truth {
        let response = status(
            env(&sim, "LOGIN"),
            env(&sim, "API_SIGNATURE"),
            &expected.provider_ref,
        )
        .send()
        .await
        .unwrap();
        assert_eq!(response.status(), 200);
        let observation = crate::providers::tupay::observation_from_status_answer(
            &expected.provider_ref,
            &response.bytes().await.unwrap(),
        )
        .unwrap();
        assert_matches_truth(expected, &observation);
    }

    let login_url = format!("{}/v1/auth/login", sim.base_url());
    let refused = http
        .post(&login_url)
        .json(&serde_json::json!({"login": env(&sim, "LOGIN"), "pass": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let token: serde_json::Value = http
        .post(&login_url)
        .json(&serde_json::json!({"login": env(&sim, "LOGIN"), "pass": env(&sim, "PASS")}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = token["token"].as_str().unwrap();
    let to = Utc::now().timestamp() + 60;
    let by_ref: HashMap<&str, &Truth> =
        truth.iter().map(|t| (t.provider_ref.as_str(), t)).collect();
    let mut seen = 0;
    for page in 0.. {
        let response = http
            .get(format!(
                "{}/v1/cashouts?from=0&to={to}&page={page}",
                sim.base_url()
            ))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let parsed =
            crate::providers::tupay::parse_search_page(&response.bytes().await.unwrap()).unwrap();
        for item in parsed.items {
            let observation = item.unwrap();
            let expected = by_ref[observation.provider_ref.as_str()];
            assert_eq!(observation.external_id, expected.external_id);
            assert_matches_truth(expected, &observation);
            seen += 1;
        }
        if parsed.is_last {
            assert_eq!(page, 1, "60 items make two pages of 50");
            break;
        }
    }
    assert_eq!(seen, 60);
    let unauthorized = http
        .get(format!(
            "{}/v1/cashouts?from=0&to={to}&page=0",
            sim.base_url()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mannco_history_has_exact_fees_and_matches_the_truth() {
    let sim = Simulator::start(SimConfig::new(ProviderKind::Mannco, 13), "127.0.0.1:0")
        .await
        .unwrap();
    sim.create_cashouts(70);
    sim.run_to_completion().await;
    let http = client();
    let login = |key: String| {
        http.post(format!("{}/user/login", sim.base_url()))
            .json(&serde_json::json!({ "apiKey": key }))
            .send()
    };
    assert_eq!(login("nope".into()).await.unwrap().status(), 401);
    let answer: serde_json::Value = login(env(&sim, "API_KEY"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["success"], true);
    let token = answer["content"]["token"].as_str().unwrap().to_string();
    assert_eq!(token.split('.').count(), 3, "looks like a JWT: {token}");

    let truth: HashMap<String, Truth> = sim
        .ground_truth()
        .into_iter()
        .map(|t| (t.provider_ref.clone(), t))
        .collect();
    let mut seen = 0;
    let mut previous_updated = None;
    for page in 1..=2 {
        let response = http
            .get(format!("{}/cashout/history?page={page}", sim.base_url()))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let body = response.bytes().await.unwrap();
        let raw: serde_json::Value = serde_json::from_slice(&body).unwrap();
        for item in raw["content"]["items"].as_array().unwrap() {
            let (amount, fee, net) = (
                item["amount"].as_i64().unwrap(),
                item["fee"].as_i64().unwrap(),
                item["netAmount"].as_i64().unwrap(),
            );
            let basis_points = if item["method"] == "payoneer" {
                200
            } else {
                150
            };
            assert_eq!(fee * 10_000, amount * basis_points, "exact fee of {item}");
            assert_eq!(net, amount - fee);
        }
        let parsed = crate::providers::mannco::parse_history_page(&body).unwrap();
        assert_eq!(parsed.is_last, page == 2);
        for item in parsed.items {
            let observation = item.unwrap();
            if let Some(previous) = previous_updated {
                assert!(observation.updated_at.unwrap() <= previous, "newest first");
            }
            previous_updated = observation.updated_at;
            assert_matches_truth(&truth[&observation.provider_ref], &observation);
            seen += 1;
        }
    }
    assert_eq!(seen, 70);
    let expired = http
        .get(format!("{}/cashout/history?page=1", sim.base_url()))
        .bearer_auth("eyJ.not.issued")
        .send()
        .await
        .unwrap();
    assert_eq!(expired.status(), 401);
    assert_eq!(mannco::fee_cents(12_345, 200), 247);
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pismo_status_endpoint_needs_the_bearer_and_matches_the_truth() {
    let sim = Simulator::start(SimConfig::new(ProviderKind::Pismo, 17), "127.0.0.1:0")
        .await
        .unwrap();
    sim.create_cashouts(20);
    sim.run_to_completion().await;
    let settings = daemon_settings(&sim);
    let status_path = settings.status_path.clone().unwrap();
    let http = client();
    for truth in sim.ground_truth() {
        let url = format!(
            "{}{}",
            sim.base_url(),
            status_path.replace("{id}", &truth.provider_ref)
        );
        assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
        let answer: serde_json::Value = http
            .get(&url)
            .bearer_auth(env(&sim, "BEARER_TOKEN"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let update =
            crate::providers::pismo::map_status(answer["status"].as_str().unwrap()).unwrap();
        assert_eq!(update.status, truth.status);
        assert_eq!(
            answer["idempotency_key"].as_str(),
            truth.external_id.as_deref()
        );
        let currency =
            crate::money::Currency::from_code(answer["currency"].as_str().unwrap()).unwrap();
        let amount = currency.parse_minor(&answer["amount"].to_string()).unwrap();
        assert_eq!(amount, truth.amount_minor);
    }
    sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_verify_parse_and_lead_to_the_truth() {
    for kind in WEBHOOK_KINDS {
        let rig = Rig::start(kind, 21, Faults::default()).await;
        rig.sim.create_cashouts(25);
        rig.sim.run_to_completion().await;
        let received = rig.received().await;
        let stats = rig.sim.stats();
        assert!(!received.is_empty(), "{kind}");
        assert!(
            received.iter().all(|(_, accepted)| *accepted),
            "{kind}: every webhook verifies"
        );
        assert_eq!(received.len(), stats.webhooks_sent, "{kind}");
        assert_eq!(
            stats.webhooks_sent, stats.webhook_events,
            "{kind}: no faults, no retries"
        );
        assert_eq!(
            stats.webhook_responses,
            BTreeMap::from([(200, stats.webhooks_sent)])
        );
        assert_eq!(stats.lost_final_state, 0, "{kind}");
        let truth = rig.sim.ground_truth();
        if kind == ProviderKind::Tupay {
            // Thin notifications: one per change after creation, naming the cash-out.
            let by_ref: HashMap<&str, &Truth> =
                truth.iter().map(|t| (t.provider_ref.as_str(), t)).collect();
            for (request, _) in &received {
                let observation = parse_webhook(kind, request);
                assert!(observation.is_thin());
                let expected = by_ref[observation.provider_ref.as_str()];
                assert_eq!(observation.external_id, expected.external_id);
            }
        } else {
            let states = states_from_webhooks(kind, &received);
            for expected in &truth {
                let state = states[&expected.provider_ref];
                assert_eq!(
                    state.status, expected.status,
                    "{kind} {}",
                    expected.provider_ref
                );
                assert_eq!(state.held, expected.held);
            }
            for (request, _) in &received {
                let observation = parse_webhook(kind, request);
                let expected = truth
                    .iter()
                    .find(|t| t.provider_ref == observation.provider_ref)
                    .unwrap();
                assert_eq!(observation.amount.unwrap().minor, expected.amount_minor);
                assert_eq!(observation.external_id, expected.external_id);
            }
        }
        if kind == ProviderKind::FiservPix {
            let bodies: Vec<String> = received
                .iter()
                .map(|(request, _)| String::from_utf8_lossy(&request.body).into_owned())
                .collect();
            assert!(
                bodies.iter().any(|b| b.contains("\"amount\":\"")),
                "string amounts"
            );
            assert!(
                bodies.iter().any(|b| !b.contains("\"amount\":\"")),
                "number amounts"
            );
        }
        rig.sim.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_webhooks_are_refused_and_counted_as_lost() {
    for kind in WEBHOOK_KINDS {
        let faults = Faults {
            tamper_every: Some(3),
            ..Faults::default()
        };
        let rig = Rig::start(kind, 23, faults).await;
        rig.sim.create_cashouts(10);
        rig.sim.run_to_completion().await;
        let received = rig.received().await;
        let stats = rig.sim.stats();
        let refused = received.iter().filter(|(_, accepted)| !accepted).count();
        assert!(stats.webhooks_tampered > 0, "{kind}");
        assert_eq!(refused, stats.webhooks_tampered, "{kind}");
        assert_eq!(stats.tampered_accepted, 0, "{kind}");
        assert_eq!(stats.webhook_responses.get(&401), Some(&refused), "{kind}");
        assert_eq!(
            stats.webhook_events,
            received.len(),
            "{kind}: a tampered webhook is sent once and not retried"
        );
        assert_eq!(stats.webhooks_tampered, stats.webhook_events / 3, "{kind}");
        rig.sim.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_duplicate_rates_hold_over_two_hundred_webhooks() {
    let faults = Faults {
        webhook_loss_pct: 20,
        webhook_duplicate_pct: 15,
        ..Faults::default()
    };
    let rig = Rig::start(ProviderKind::Simpay, 99, faults).await;
    rig.sim.create_cashouts(80);
    rig.sim.run_to_completion().await;
    let stats = rig.sim.stats();
    let received = rig.received().await;
    assert!(stats.webhook_events >= 200, "{stats:?}");
    let loss = stats.webhooks_lost as f64 / stats.webhook_events as f64;
    assert!((0.12..=0.28).contains(&loss), "loss rate {loss}: {stats:?}");
    let delivered = stats.webhook_events - stats.webhooks_lost;
    let duplicates = stats.webhooks_duplicated as f64 / delivered as f64;
    assert!(
        (0.08..=0.23).contains(&duplicates),
        "duplicate rate {duplicates}: {stats:?}"
    );
    assert_eq!(received.len(), delivered + stats.webhooks_duplicated);
    assert_eq!(stats.webhooks_sent, received.len());
    let distinct: std::collections::HashSet<&Vec<u8>> =
        received.iter().map(|(request, _)| &request.body).collect();
    assert_eq!(
        distinct.len(),
        delivered,
        "a duplicate repeats the body exactly"
    );

    // lost_final_state counts exactly the cash-outs whose final webhook never arrived.
    let mut final_seen: HashMap<String, bool> = HashMap::new();
    let truth = rig.sim.ground_truth();
    for (request, _) in &received {
        let observation = parse_webhook(ProviderKind::Simpay, request);
        let expected = truth
            .iter()
            .find(|t| t.provider_ref == observation.provider_ref)
            .unwrap();
        if observation.status.map(|u| u.status) == Some(expected.status) {
            final_seen.insert(observation.provider_ref, true);
        }
    }
    let missing_final = truth.len() - final_seen.len();
    assert!(missing_final > 0);
    assert_eq!(stats.lost_final_state, missing_final);
    rig.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_and_delayed_webhooks_all_arrive_after_flush() {
    let faults = Faults {
        reorder: true,
        max_delay_ms: 30,
        ..Faults::default()
    };
    let rig = Rig::start(ProviderKind::FiservPix, 31, faults).await;
    rig.sim.create_cashouts(40);
    rig.sim.run_to_completion().await;
    let stats = rig.sim.stats();
    let received = rig.received().await;
    assert_eq!(received.len(), stats.webhook_events);
    assert_eq!(stats.lost_final_state, 0);
    let states = states_from_webhooks(ProviderKind::FiservPix, &received);
    let mut out_of_order = 0;
    let mut last_rank: HashMap<String, u8> = HashMap::new();
    for (request, _) in &received {
        let observation = parse_webhook(ProviderKind::FiservPix, request);
        let rank = observation.status.unwrap().status.rank();
        let previous = last_rank
            .insert(observation.provider_ref, rank)
            .unwrap_or(0);
        if rank < previous {
            out_of_order += 1;
        }
    }
    assert!(out_of_order > 0, "some webhooks arrive after later ones");
    for truth in rig.sim.ground_truth() {
        assert_eq!(states[&truth.provider_ref].status, truth.status);
    }
    rig.sim.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_api_faults_and_the_rate_limit_answer_like_a_provider() {
    let sim = Simulator::start(SimConfig::new(ProviderKind::Pismo, 41), "127.0.0.1:0")
        .await
        .unwrap();
    let refs = sim.create_cashouts(1);
    sim.set_faults(Faults {
        api_5xx_pct: 30,
        api_429_pct: 20,
        ..Faults::default()
    });
    let http = client();
    let url = format!("{}/v1/cashouts/{}", sim.base_url(), refs[0]);
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for _ in 0..100 {
        let response = http
            .get(&url)
            .bearer_auth(env(&sim, "BEARER_TOKEN"))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            assert_eq!(response.headers()["retry-after"], "1");
        }
        *by_status.entry(response.status().as_u16()).or_insert(0) += 1;
    }
    let (ok, unavailable, throttled) = (by_status[&200], by_status[&503], by_status[&429]);
    assert!((15..=45).contains(&unavailable), "{by_status:?}");
    assert!((8..=35).contains(&throttled), "{by_status:?}");
    assert_eq!(ok + unavailable + throttled, 100);
    let stats = sim.stats();
    assert_eq!(stats.api_requests, 100);
    assert_eq!(stats.api_faults, unavailable + throttled);

    sim.set_faults(Faults {
        api_timeout_pct: 100,
        ..Faults::default()
    });
    let timed_out = http
        .get(&url)
        .timeout(Duration::from_millis(300))
        .send()
        .await
        .unwrap_err();
    assert!(timed_out.is_timeout());
    sim.stop().await;

    let limited = Simulator::start(
        SimConfig {
            max_rps: Some(5),
            ..SimConfig::new(ProviderKind::Mannco, 41)
        },
        "127.0.0.1:0",
    )
    .await
    .unwrap();
    let url = format!("{}/cashout/history?page=1", limited.base_url());
    let answers = futures_util::future::join_all((0..20).map(|_| http.get(&url).send())).await;
    let throttled: Vec<_> = answers
        .into_iter()
        .map(Result::unwrap)
        .filter(|response| response.status() == 429)
        .collect();
    assert!(throttled.len() >= 5, "{} throttled", throttled.len());
    assert!(throttled.iter().all(|r| r.headers()["retry-after"] == "1"));
    assert_eq!(limited.stats().api_rate_limited, throttled.len());
    limited.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_is_retried_then_counted_as_failed() {
    let daemon = MockServer::start().await;
    Mock::given(any())
        .respond_with(ResponseTemplate::new(503))
        .mount(&daemon)
        .await;
    let config = SimConfig {
        webhook_target: Some(format!("{}/webhooks/simt", daemon.uri())),
        ..SimConfig::new(ProviderKind::Pismo, 43)
    };
    let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
    sim.create_cashouts(2);
    sim.run_to_completion().await;
    let stats = sim.stats();
    assert_eq!(stats.webhook_events, 4);
    assert_eq!(stats.webhooks_failed, 4);
    assert_eq!(stats.webhooks_sent, 4 * DELIVERY_ATTEMPTS as usize);
    assert_eq!(stats.lost_final_state, 2);
    sim.stop().await;
}

#[test]
fn flipping_a_signature_character_changes_it_within_its_alphabet() {
    assert_eq!(flip_char("abc", 0), "bbc");
    assert_eq!(flip_char("Abc", 0), "Bbc");
    assert_eq!(flip_char("0bc", 0), "abc");
    assert_eq!(flip_char("x.y.Zz", 4), "x.y.Az");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_own_clients_read_the_truth_from_every_simulator() {
    use crate::providers::client::{build_client, SearchWindow};
    for kind in simulated_kinds() {
        let sim = Simulator::start(SimConfig::new(kind, 51), "127.0.0.1:0")
            .await
            .unwrap();
        sim.create_cashouts(60);
        sim.run_to_completion().await;
        let env: BTreeMap<String, String> = sim.env_vars("SIMT").into_iter().collect();
        let settings =
            Settings::parse(&sim.provider_toml("simt", "SIMT"), Path::new("."), &env).unwrap();
        let metrics = crate::metrics::Metrics::new();
        let client = build_client(&settings.providers[0], &settings.poll, &metrics, None)
            .unwrap_or_else(|| panic!("{kind}: no client"));
        let truth: HashMap<String, Truth> = sim
            .ground_truth()
            .into_iter()
            .map(|t| (t.provider_ref.clone(), t))
            .collect();
        if client.can_search() {
            let window = SearchWindow {
                from: Utc::now() - chrono::Duration::hours(1),
                to: Utc::now() + chrono::Duration::hours(1),
            };
            let mut seen = std::collections::HashSet::new();
            let mut page = Some(client.first_page());
            while let Some(number) = page {
                let answer = client
                    .search_page(window, number)
                    .await
                    .unwrap_or_else(|err| panic!("{kind} search: {err}"));
                for item in answer.items {
                    let observation = item.unwrap();
                    assert_matches_truth(&truth[&observation.provider_ref], &observation);
                    seen.insert(observation.provider_ref);
                }
                page = answer.next_page;
            }
            assert_eq!(seen.len(), 60, "{kind}: the search finds every cash-out");
        }
        if client.can_fetch_status() {
            for expected in truth.values().take(15) {
                let observation = client
                    .fetch_status(&expected.provider_ref)
                    .await
                    .unwrap_or_else(|err| panic!("{kind} status: {err}"));
                assert_eq!(observation.provider_ref, expected.provider_ref);
                assert_matches_truth(expected, &observation);
            }
        }
        let stats = sim.stats();
        assert_eq!(stats.api_auth_failures, 0, "{kind}: {stats:?}");

        // A revoked token is refused once; the client logs in again and carries on.
        sim.revoke_tokens();
        if client.can_search() {
            let window = SearchWindow {
                from: Utc::now() - chrono::Duration::hours(1),
                to: Utc::now() + chrono::Duration::hours(1),
            };
            client
                .search_page(window, client.first_page())
                .await
                .unwrap();
        } else {
            let some_ref = truth.keys().next().unwrap();
            client.fetch_status(some_ref).await.unwrap();
        }
        let uses_tokens = matches!(
            kind,
            ProviderKind::Simpay | ProviderKind::Tupay | ProviderKind::Mannco
        );
        let refused = sim.stats().api_auth_failures;
        assert_eq!(refused, usize::from(uses_tokens), "{kind}");
        sim.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_rotate_across_every_target() {
    let first = MockServer::start().await;
    let second = MockServer::start().await;
    for daemon in [&first, &second] {
        Mock::given(any())
            .respond_with(ResponseTemplate::new(200))
            .mount(daemon)
            .await;
    }
    let config = SimConfig {
        webhook_target: Some(format!("{}/webhooks/simt", first.uri())),
        more_webhook_targets: vec![format!("{}/webhooks/simt", second.uri())],
        ..SimConfig::new(ProviderKind::Pismo, 44)
    };
    let sim = Simulator::start(config, "127.0.0.1:0").await.unwrap();
    sim.create_cashouts(4);
    sim.run_to_completion().await;
    let sent = sim.stats().webhooks_sent;
    let to_first = first.received_requests().await.unwrap().len();
    let to_second = second.received_requests().await.unwrap().len();
    assert_eq!(to_first + to_second, sent);
    assert!(
        to_first.abs_diff(to_second) <= 1,
        "{to_first} vs {to_second}"
    );
    sim.stop().await;

    let elsewhere = SimConfig {
        webhook_target: Some(format!("{}/webhooks/simt", first.uri())),
        more_webhook_targets: vec![format!("{}/webhooks/other", second.uri())],
        ..SimConfig::new(ProviderKind::FiservPix, 45)
    };
    let refused = Simulator::start(elsewhere, "127.0.0.1:0")
        .await
        .err()
        .unwrap();
    assert!(
        refused.to_string().contains("must have the path"),
        "{refused}"
    );
}

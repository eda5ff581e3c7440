//! The console's page frame (navigation, CSS) and how it writes times, ages and amounts:
//! amounts as the CSV does, times in `reports.timezone` with the UTC instant on hover.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use maud::{html, Markup, DOCTYPE};

use crate::http::admin::Role;
use crate::report::csv::format_amount;
use crate::store::from_millis;

/// The stylesheet (served at `/console/static/console.css`, the only asset).
pub const CSS: &str = r#"
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --bg:#f6f7f9; --card:#fff;
  --accent:#1f5fbf; --bad:#b3261e; --bad-bg:#fdecea; --ok:#1e7d32; --warn:#8a5a00; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color:var(--fg); background:var(--bg); }
header { background:#18202e; color:#fff; padding:.5rem 1rem; display:flex; flex-wrap:wrap;
  align-items:center; gap:.25rem 1rem; }
header .brand { font-weight:600; margin-right:1rem; }
header nav { display:flex; flex-wrap:wrap; gap:.25rem; flex:1; }
header a { color:#dfe7f5; text-decoration:none; padding:.3rem .5rem; border-radius:4px; }
header a[aria-current=page] { background:#2f3b52; color:#fff; }
header form { margin:0; }
header .role { color:#aab4c6; font-size:.85rem; }
main { padding:1rem .75rem; max-width:1400px; margin:0 auto; }
h1 { font-size:1.35rem; margin:.25rem 0 1rem; }
h2 { font-size:1.1rem; margin:1.5rem 0 .5rem; }
a { color:var(--accent); }
a:focus-visible, button:focus-visible, input:focus-visible, select:focus-visible,
summary:focus-visible { outline:3px solid #ffb000; outline-offset:2px; }
.scroll { overflow-x:auto; background:var(--card); border:1px solid var(--line); border-radius:6px; }
table { border-collapse:collapse; width:100%; font-size:.875rem; }
th, td { text-align:left; padding:.35rem .45rem; border-bottom:1px solid var(--line);
  white-space:nowrap; vertical-align:top; }
th { background:#eef1f5; font-weight:600; font-size:.8rem; color:var(--muted);
  white-space:normal; min-width:3.5rem; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; }
td.wrap { white-space:normal; min-width:16rem; }
tr.alert td { background:var(--bad-bg); }
tr.alert td:first-child { border-left:4px solid var(--bad); }
.badge { display:inline-block; padding:0 .4rem; border-radius:3px; font-size:.8rem;
  background:#e6e9ef; }
.badge.bad { background:var(--bad); color:#fff; }
.badge.ok { background:var(--ok); color:#fff; }
.muted { color:var(--muted); font-size:.8rem; }
form.inline { display:inline; }
form.search { display:flex; flex-wrap:wrap; gap:.5rem; align-items:end; margin-bottom:1rem; }
form.search label { display:flex; flex-direction:column; font-size:.85rem; color:var(--muted); }
input, select, button { font:inherit; padding:.35rem .5rem; border:1px solid #b8bfcc;
  border-radius:4px; background:#fff; }
button { background:var(--accent); color:#fff; border-color:var(--accent); cursor:pointer; }
button.secondary { background:#fff; color:var(--accent); }
td button { padding:.15rem .4rem; font-size:.8rem; }
header button { background:transparent; border-color:#6b7890; color:#dfe7f5; }
dl.facts { display:grid; grid-template-columns:max-content 1fr; gap:.25rem 1rem;
  background:var(--card); border:1px solid var(--line); border-radius:6px; padding:.75rem 1rem; }
dl.facts dt { color:var(--muted); }
dl.facts dd { margin:0; overflow-wrap:anywhere; }
.flash { padding:.6rem .8rem; border-radius:6px; background:#e8f1fd; border:1px solid #b6cff5;
  margin-bottom:1rem; }
.flash.bad { background:var(--bad-bg); border-color:#f0b3ad; }
pre { background:#fff; border:1px solid var(--line); padding:.75rem; overflow:auto;
  white-space:pre-wrap; overflow-wrap:anywhere; }
.pager { margin:.75rem 0; display:flex; gap:1rem; }
.signin { max-width:24rem; margin:10vh auto; background:var(--card); padding:1.5rem;
  border:1px solid var(--line); border-radius:8px; }
.signin label { display:block; margin:.75rem 0 .25rem; }
.signin input { width:100%; }
.signin button { margin-top:1rem; width:100%; }
@media (max-width: 640px) {
  main { padding:.5rem; }
  header { padding:.5rem; }
  th, td { padding:.35rem .4rem; font-size:.9rem; }
  dl.facts { grid-template-columns:1fr; }
}
"#;

/// The sections of the navigation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    Overview,
    Cashouts,
    Mismatches,
    Alerts,
    Reports,
    Quarantine,
}

const NAV: [(Section, &str, &str); 6] = [
    (Section::Overview, "/console", "Overview"),
    (Section::Cashouts, "/console/cashouts", "Cash-outs"),
    (Section::Mismatches, "/console/mismatches", "Mismatches"),
    (Section::Alerts, "/console/alerts", "Alerts"),
    (Section::Reports, "/console/reports", "Reports"),
    (Section::Quarantine, "/console/quarantine", "Quarantine"),
];

/// What every signed-in page frame needs.
pub struct Frame<'a> {
    pub role: Role,
    pub csrf: &'a str,
    pub section: Section,
}

/// A full page: head, navigation (only what the role may open), sign-out, content.
pub fn page(frame: &Frame<'_>, title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · cashout-recon console" }
                link rel="stylesheet" href="/console/static/console.css";
            }
            body {
                header {
                    span.brand { "cashout-recon" }
                    nav aria-label="Console sections" {
                        @for (section, href, label) in NAV {
                            @if frame.role == Role::Admin || section == Section::Reports {
                                @if section == frame.section {
                                    a href=(href) aria-current="page" { (label) }
                                } @else {
                                    a href=(href) { (label) }
                                }
                            }
                        }
                    }
                    span.role {
                        @match frame.role { Role::Admin => "admin", Role::Reports => "reports" }
                    }
                    form method="post" action="/console/sign-out" {
                        input type="hidden" name="csrf" value=(frame.csrf);
                        button type="submit" { "Sign out" }
                    }
                }
                main { (content) }
            }
        }
    }
}

/// A page outside a session (sign-in, errors before sign-in).
pub fn bare_page(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · cashout-recon console" }
                link rel="stylesheet" href="/console/static/console.css";
            }
            body { main { (content) } }
        }
    }
}

/// `2026-11-30 09:15:02 -03` in `tz`, the RFC 3339 UTC instant in `title` and `datetime`.
pub fn time(at: DateTime<Utc>, tz: Tz) -> Markup {
    let utc = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let local = at
        .with_timezone(&tz)
        .format("%Y-%m-%d %H:%M:%S %Z")
        .to_string();
    html! { time datetime=(utc) title=(utc) { (local) } }
}

/// [`time`] of stored unix milliseconds.
pub fn time_ms(millis: i64, tz: Tz) -> Markup {
    time(from_millis(millis), tz)
}

/// An optional time, or a dash.
pub fn maybe_time_ms(millis: Option<i64>, tz: Tz) -> Markup {
    match millis {
        Some(millis) => time_ms(millis, tz),
        None => html! { span.muted { "—" } },
    }
}

/// A duration in words: `45 s`, `12 min`, `3 h 5 min`, `2 d 4 h`.
pub fn age_text(millis: i64) -> String {
    let seconds = millis.max(0) / 1000;
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min", s / 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        s => format!("{} d {} h", s / 86_400, (s % 86_400) / 3600),
    }
}

/// `12 min ago` over the absolute time (as [`time`]), or a dash.
pub fn ago(millis: Option<i64>, now: DateTime<Utc>, tz: Tz) -> Markup {
    match millis {
        Some(millis) => {
            let at = from_millis(millis);
            let utc = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let local = at
                .with_timezone(&tz)
                .format("%Y-%m-%d %H:%M:%S %Z")
                .to_string();
            html! {
                time datetime=(utc) title=(utc) {
                    (age_text(now.timestamp_millis() - millis)) " ago"
                    br; span.muted { (local) }
                }
            }
        }
        None => html! { span.muted { "never" } },
    }
}

/// An amount as the CSV writes it (`100.00`), or a dash when unknown.
pub fn amount(minor: Option<i64>, currency: Option<&str>) -> Markup {
    let text = format_amount(minor, currency);
    if text.is_empty() {
        html! { span.muted { "—" } }
    } else {
        html! { (text) }
    }
}

/// Optional text, or a dash.
pub fn text_or_dash(text: Option<&str>) -> Markup {
    match text {
        Some(text) if !text.is_empty() => html! { (text) },
        _ => html! { span.muted { "—" } },
    }
}

/// A hidden CSRF field for a form.
pub fn csrf_field(csrf: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(csrf); }
}

/// A percent-encoded path segment (provider refs may hold any character).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte))
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The link to a cash-out's page.
pub fn cashout_href(provider: &str, provider_ref: &str) -> String {
    format!(
        "/console/cashouts/{}/{}",
        segment(provider),
        segment(provider_ref)
    )
}

/// A query string of the non-empty pairs.
pub fn query(pairs: &[(&str, Option<&str>)]) -> String {
    let mut serializer = form_urlencoded::Serializer::new(String::new());
    for (name, value) in pairs {
        if let Some(value) = value.filter(|v| !v.is_empty()) {
            serializer.append_pair(name, value);
        }
    }
    serializer.finish()
}

/// An empty-table line.
pub fn empty_row(columns: usize, text: &str) -> Markup {
    html! { tr { td colspan=(columns) .muted { (text) } } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_show_the_report_zone_and_hold_the_utc_instant() {
        let at = from_millis(1_764_494_102_000); // 2025-11-30T09:15:02Z
        let html = time(at, chrono_tz::America::Sao_Paulo).into_string();
        assert!(html.contains(r#"title="2025-11-30T09:15:02Z""#), "{html}");
        assert!(html.contains("2025-11-30 06:15:02 -03"), "{html}");
    }

    #[test]
    fn amounts_are_written_as_in_the_csv() {
        assert_eq!(amount(Some(123_456), Some("BRL")).into_string(), "1234.56");
        assert_eq!(amount(Some(5), Some("JPY")).into_string(), "5");
        assert!(amount(None, Some("BRL")).into_string().contains('—'));
    }

    #[test]
    fn path_segments_are_percent_encoded() {
        assert_eq!(
            cashout_href("fiserv", "a/b c"),
            "/console/cashouts/fiserv/a%2Fb%20c"
        );
    }

    #[test]
    fn ages_read_in_words() {
        assert_eq!(age_text(59_000), "59 s");
        assert_eq!(age_text(3 * 60_000), "3 min");
        assert_eq!(age_text(3_900_000), "1 h 5 min");
        assert_eq!(age_text(2 * 86_400_000 + 4 * 3_600_000), "2 d 4 h");
    }
}

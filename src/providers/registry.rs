//! The configured providers by id: settings, adapter and built verifier of each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{ProviderSettings, Settings};
use crate::providers::{Observation, ParseError, ProviderAdapter};
use crate::verify::{InboundRequest, Verifier};

/// One `[[providers]]` entry, ready to receive webhooks.
pub struct ConfiguredProvider {
    pub settings: ProviderSettings,
    pub adapter: &'static dyn ProviderAdapter,
    /// `None` for a provider that sends no webhooks.
    pub verifier: Option<Verifier>,
    unverified_fetches: Mutex<FixedWindow>,
}

impl ConfiguredProvider {
    /// The provider's id (the `{provider_id}` of its webhook URL).
    pub fn id(&self) -> &str {
        &self.settings.id
    }

    /// Parses and maps a verified webhook, then checks its ids against the id rule; an
    /// error is the quarantine reason (field and rule, never the value).
    pub fn parse_webhook(&self, request: &InboundRequest<'_>) -> Result<Observation, ParseError> {
        let observation = self.adapter.parse_webhook(request)?;
        observation.check_ids(self.adapter.kind())?;
        Ok(observation)
    }

    /// The configured position of the secret whose index (among the set ones) the
    /// verifier reported: its place in `webhook_secrets_env`, so an event verified by the
    /// second variable records 1 even when the first is unset. Key-based verifiers
    /// (Pismo's public keys) report their key's position already.
    pub fn secret_position(&self, verified_index: usize) -> usize {
        match &self.verifier {
            Some(Verifier::Jwt(_)) | None => verified_index,
            Some(_) => self
                .settings
                .webhook_secrets
                .get(verified_index)
                .map_or(verified_index, |secret| secret.position),
        }
    }

    /// Whether one more status fetch caused by an unverified webhook fits this minute.
    pub fn allow_unverified_fetch(&self, per_minute: u32) -> bool {
        match self.unverified_fetches.lock() {
            Ok(mut window) => window.try_take(per_minute, Instant::now()),
            Err(_) => false,
        }
    }
}

/// A counter that resets every minute: bounds what strangers can make us do.
struct FixedWindow {
    started: Instant,
    used: u32,
}

impl FixedWindow {
    fn try_take(&mut self, limit: u32, now: Instant) -> bool {
        if now.duration_since(self.started) >= Duration::from_secs(60) {
            self.started = now;
            self.used = 0;
        }
        if self.used < limit {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// All configured providers.
#[derive(Clone, Default)]
pub struct ProviderRegistry {
    by_id: HashMap<String, Arc<ConfiguredProvider>>,
    order: Vec<String>,
}

impl ProviderRegistry {
    /// Builds every provider's verifier; an error names the provider.
    pub fn build(settings: &Settings) -> Result<ProviderRegistry, String> {
        let mut registry = ProviderRegistry::default();
        for provider in &settings.providers {
            let verifier = provider
                .build_verifier()
                .map_err(|err| format!("provider {}: {err}", provider.id))?;
            registry.order.push(provider.id.clone());
            registry.by_id.insert(
                provider.id.clone(),
                Arc::new(ConfiguredProvider {
                    settings: provider.clone(),
                    adapter: provider.kind.adapter(),
                    verifier,
                    unverified_fetches: Mutex::new(FixedWindow {
                        started: Instant::now(),
                        used: 0,
                    }),
                }),
            );
        }
        Ok(registry)
    }

    /// The provider with this id.
    pub fn get(&self, id: &str) -> Option<&Arc<ConfiguredProvider>> {
        self.by_id.get(id)
    }

    /// Every provider, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ConfiguredProvider>> {
        self.order.iter().filter_map(|id| self.by_id.get(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unverified_fetch_window_caps_and_resets() {
        let start = Instant::now();
        let mut window = FixedWindow {
            started: start,
            used: 0,
        };
        assert!(window.try_take(2, start));
        assert!(window.try_take(2, start));
        assert!(!window.try_take(2, start));
        assert!(window.try_take(2, start + Duration::from_secs(61)));
    }
}

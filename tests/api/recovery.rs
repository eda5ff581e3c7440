//! End to end against all five simulators: webhooks lost, duplicated and reordered, the
//! providers' APIs failing with 5xx and 429; polling must make the book equal the ground
//! truth, counting exactly one `missed_webhook` per state the webhooks failed to report.

use std::collections::BTreeMap;
use std::sync::Arc;

use cashout_recon::providers::ProviderKind;

use crate::world::{run_all_to_completion, World, PER_PROVIDER};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_recovers_every_lost_state_and_counts_each_once() {
    // Arrange: 300 cash-outs, 30 % of webhooks lost, 10 % duplicated, reordered; the
    // providers' APIs answer 5 % 5xx and some 429s.
    let world = World::new(1000).await;
    let daemon = world.start_daemon().await;
    for (_, simulator) in &world.simulators {
        simulator.create_cashouts(PER_PROVIDER);
    }
    world.register_ledger(&daemon.state.store).await;
    run_all_to_completion(&world).await;
    daemon.drain_fetches().await;

    // What webhooks failed to report: each such cash-out needs exactly one recovery.
    let mut expected_recoveries = BTreeMap::new();
    for (id, simulator) in &world.simulators {
        let differences = daemon.differences(id, &simulator.ground_truth()).await;
        let stats = simulator.stats();
        if simulator.kind() == ProviderKind::Mannco {
            // No webhooks at all: polling is how it works, not a recovery.
            expected_recoveries.insert(*id, 0);
            continue;
        }
        if matches!(
            simulator.kind(),
            ProviderKind::FiservPix | ProviderKind::Simpay | ProviderKind::Pismo
        ) {
            assert_eq!(
                differences.len(),
                stats.lost_final_state,
                "{id}: the book differs exactly where the final webhook was lost: {differences:?}"
            );
        }
        assert!(
            stats.webhooks_lost > 0 && stats.webhooks_duplicated > 0,
            "{id}: faults were injected: {stats:?}"
        );
        expected_recoveries.insert(*id, differences.len() as u64);
    }
    assert!(
        expected_recoveries.values().sum::<u64>() > 0,
        "the faults lost some final states"
    );

    // Act
    daemon.poll_until_settled(&world).await;

    // Assert: the book equals the truth (checked by poll_until_settled), and every lost
    // state was recovered once — no more, no less.
    for (id, expected) in &expected_recoveries {
        assert_eq!(
            daemon.recovered(id),
            *expected,
            "{id}: missed_webhook recoveries"
        );
    }
    let (status, mismatches) = {
        let missed = daemon
            .state
            .store
            .list_mismatches(Some("missed_webhook".to_string()), false)
            .await
            .expect("mismatches");
        (200, missed)
    };
    assert_eq!(status, 200);
    assert_eq!(
        mismatches.len() as u64,
        expected_recoveries.values().sum::<u64>(),
        "one missed_webhook record each"
    );
    let api_faults: usize = world
        .simulators
        .iter()
        .map(|(_, s)| s.stats().api_faults)
        .sum();
    assert!(api_faults > 0, "the providers' APIs did fail along the way");
    daemon.stop().await;
    for (_, simulator) in &world.simulators {
        simulator.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restarted_between_cycles_loses_nothing_and_skips_no_window() {
    // Arrange
    let world = Arc::new(World::new(2000).await);
    let mut daemon = world.start_daemon().await;
    for (_, simulator) in &world.simulators {
        simulator.create_cashouts(PER_PROVIDER);
    }
    world.register_ledger(&daemon.state.store).await;

    // Act: advance in steps; between steps, poll and restart the daemon. Webhooks sent
    // while it is down are lost to it; the watermark carries each sweep over the gap.
    for step in 0..6 {
        let mut moved = 0;
        for (_, simulator) in &world.simulators {
            moved += simulator.advance().await;
        }
        for (id, _) in &world.simulators {
            daemon.state.poller.poll_once(id).await.expect("poll cycle");
        }
        daemon.stop().await;
        if step % 2 == 0 {
            // Webhooks of this step reach nobody.
            for (_, simulator) in &world.simulators {
                simulator.advance().await;
            }
        }
        daemon = world.start_daemon().await;
        if moved == 0 {
            break;
        }
    }
    run_all_to_completion(&world).await;
    daemon.drain_fetches().await;

    // Assert
    daemon.poll_until_settled(&world).await;
    for (id, _) in &world.simulators {
        let watermark = daemon
            .state
            .store
            .watermark(id.to_string())
            .await
            .expect("watermark");
        if matches!(*id, "fiserv" | "tupay" | "mannco") {
            assert!(
                watermark.is_some(),
                "{id}: search sweeps record their window"
            );
        }
    }
    daemon.stop().await;
    for (_, simulator) in &world.simulators {
        simulator.stop().await;
    }
}

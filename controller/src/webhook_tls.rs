//! The webhook's serving certificate and the `caBundle` of its MutatingWebhookConfiguration,
//! kept current by the leader (the webhook replicas only read the Secret).

use std::time::Duration;

use kube::Client;
use rolemesh_webhook::tls::{WebhookTlsConfig, reconcile_webhook_tls};
use time::OffsetDateTime;
use tracing::{info, warn};

/// Re-checks at least this often, so that an edited Secret or configuration is repaired soon.
const RECHECK: Duration = Duration::from_secs(60);

pub async fn maintain_webhook_tls(client: Client, config: WebhookTlsConfig) {
    loop {
        let wait = match reconcile_webhook_tls(&client, &config).await {
            Ok(tls) => {
                if tls.issued || tls.ca_bundle_patched {
                    info!(serial = %tls.serial_hex, not_after = %tls.not_after, ca_bundle_patched = tls.ca_bundle_patched, "webhook serving certificate in force");
                }
                let until_renewal = tls.renew_at - OffsetDateTime::now_utc();
                Duration::try_from(until_renewal)
                    .unwrap_or(Duration::from_secs(1))
                    .min(RECHECK)
            }
            Err(error) => {
                warn!(%error, namespace = %config.namespace, "failed to maintain the webhook's TLS material");
                Duration::from_secs(10)
            }
        };
        tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
    }
}

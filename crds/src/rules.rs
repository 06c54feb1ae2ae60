//! A policy's peer rules as the proxy reads them: one conversion, used by the controller that
//! writes them and the webhook that checks a policy at admission.

use rolemesh_profile::{
    ProfileError,
    proxy_config::{InboundRules, OutboundRules, PeerPattern, PeerRules},
};

use crate::{CallerIdentity, MTLSPolicy};

impl MTLSPolicy {
    /// What of this policy a proxy takes only when its pod is created: the mappings, their ports
    /// and callerIdentity, in a canonical text the webhook records on each pod
    /// ([`crate::names::PROXY_PORTS_ANNOTATION`]) and the controller compares with the current
    /// generation's to find pods that need a restart.
    pub fn start_ports(&self) -> String {
        let inbound = self.spec.inbound.iter().map(|m| match m.caller_identity {
            // Written only when not l4, so that pods injected before the field existed do
            // not all turn stale on upgrade.
            CallerIdentity::L4 => format!("in {} {}>{}", m.name, m.port, m.app_port),
            other => format!("in {} {}>{} {other}", m.name, m.port, m.app_port),
        });
        let outbound = self
            .spec
            .outbound
            .iter()
            .map(|m| format!("out {} {}", m.name, m.local_port));
        inbound.chain(outbound).collect::<Vec<_>>().join(", ")
    }

    /// The peer rules of this policy's current generation, validated as the proxy will.
    pub fn peer_rules(&self) -> Result<PeerRules, ProfileError> {
        let patterns = |list: &[String]| {
            list.iter()
                .map(|p| PeerPattern::new(p))
                .collect::<Result<Vec<_>, _>>()
        };
        let inbound = self
            .spec
            .inbound
            .iter()
            .map(|m| {
                Ok(InboundRules {
                    name: m.name.clone(),
                    allow: patterns(&m.allow)?,
                })
            })
            .collect::<Result<Vec<_>, ProfileError>>()?;
        let outbound = self
            .spec
            .outbound
            .iter()
            .map(|m| {
                Ok(OutboundRules {
                    name: m.name.clone(),
                    upstream: m.upstream.clone(),
                    expect: patterns(&m.expect)?,
                })
            })
            .collect::<Result<Vec<_>, ProfileError>>()?;
        let rules = PeerRules {
            policy: self.metadata.name.clone().unwrap_or_default(),
            generation: self.metadata.generation.unwrap_or(0),
            inbound,
            outbound,
        };
        rules.validate()?;
        Ok(rules)
    }
}

#[cfg(test)]
mod tests {
    use crate::{CallerIdentity, InboundMapping, MTLSPolicy, MTLSPolicySpec, OutboundMapping};

    #[test]
    fn a_policy_becomes_the_rules_of_its_generation() {
        let mut policy = MTLSPolicy::new(
            "web",
            MTLSPolicySpec {
                inbound: vec![InboundMapping {
                    name: "http".into(),
                    port: 8443,
                    app_port: 8080,
                    allow: vec!["arn:aws:iam::111122223333:role/frontend".into()],
                    caller_identity: CallerIdentity::L4,
                }],
                outbound: vec![OutboundMapping {
                    name: "db".into(),
                    local_port: 9000,
                    upstream: "db.shop.svc:5432".into(),
                    expect: vec!["spiffe://rolemesh.local/ns/shop/sa/db".into()],
                }],
                ..MTLSPolicySpec::default()
            },
        );
        policy.metadata.generation = Some(4);
        let rules = policy.peer_rules().expect("valid rules");
        assert_eq!((rules.policy.as_str(), rules.generation), ("web", 4));
        assert_eq!(rules.allow("http").map(<[_]>::len), Some(1));
        assert_eq!(
            rules.outbound("db").map(|o| o.upstream.as_str()),
            Some("db.shop.svc:5432")
        );
        assert_eq!(policy.start_ports(), "in http 8443>8080, out db 9000");
        // callerIdentity is start configuration (a pod injected with another one is stale), and
        // l4 reads as before the field existed.
        policy.spec.inbound[0].caller_identity = CallerIdentity::Http;
        assert_eq!(policy.start_ports(), "in http 8443>8080 http, out db 9000");
        policy.spec.inbound[0].caller_identity = CallerIdentity::ProxyProtocolV2;
        assert_eq!(
            policy.start_ports(),
            "in http 8443>8080 proxyProtocolV2, out db 9000"
        );
        policy.spec.inbound[0].caller_identity = CallerIdentity::L4;
        policy.spec.inbound[0].allow = vec!["arn:aws:iam::*:role/frontend".into()];
        let error = policy.peer_rules().unwrap_err().to_string();
        assert!(error.contains("account field"), "{error}");
    }
}

//! What one client may cost the webhook. Every pod in the cluster can reach the webhook's port,
//! and with `failurePolicy: Fail` a webhook that is out of memory or out of connections stops pod
//! creation in every opted-in namespace, so each resource a request holds is bounded:
//!
//! - connections: at most [`Limits::max_connections`] at once; at the cap a new connection takes
//!   the place of the oldest one that is not answering a request (see [`crate::connections`]);
//! - time: the TLS handshake within [`Limits::handshake_timeout`], a whole request (headers and
//!   body) within [`Limits::request_timeout`] of its first byte or of the connection's start, and
//!   a kept-alive connection idle for at most [`Limits::idle_timeout`];
//! - memory: request bodies buffered together at most [`Limits::body_memory_bytes`], and each
//!   review is measured by [`inspect_review`] (a pass over the raw JSON that allocates nothing)
//!   before it is decoded into a `Pod`, where a `{}` container becomes a struct of kilobytes:
//!   reviews with more containers or volumes than any real pod, or whose decoded form would exceed
//!   [`Limits::max_decoded_bytes`], are refused with a message naming the limit, and decoded
//!   reviews held together stay within [`Limits::decode_memory_bytes`].

use std::{fmt, mem::size_of, time::Duration};

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EphemeralContainer, TopologySpreadConstraint, Volume, VolumeMount,
    VolumeProjection, WeightedPodAffinityTerm,
};
use rolemesh_connections::ConnectionLimits;
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::error::Error;

/// The bounds, set from the command line (see `rolemesh-webhook --help`).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// Time for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time for a whole request, headers and body, from its first byte (for a new connection,
    /// from the accept, the TLS handshake included).
    pub request_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Largest request body; larger ones get 413.
    pub max_body_bytes: usize,
    /// Request bodies buffered at once, all connections together.
    pub body_memory_bytes: usize,
    /// Estimated memory of one decoded review; larger ones are refused.
    pub max_decoded_bytes: usize,
    /// Estimated memory of the decoded reviews held at once.
    pub decode_memory_bytes: usize,
    /// Containers, init containers and ephemeral containers of one pod, together.
    pub max_containers: usize,
    /// Volumes of one pod.
    pub max_volumes: usize,
}

pub const MIB: usize = 1024 * 1024;

/// The defaults, which the command line shows; docs/operations.md explains each.
pub mod defaults {
    pub const MAX_CONNECTIONS: usize = 512;
    pub const HANDSHAKE_TIMEOUT_SECONDS: u64 = 5;
    pub const REQUEST_TIMEOUT_SECONDS: u64 = 10;
    pub const IDLE_TIMEOUT_SECONDS: u64 = 60;
    /// The API server sends at most 3 MiB (its own request limit).
    pub const MAX_BODY_MIB: usize = 3;
    pub const BODY_MEMORY_MIB: usize = 16;
    pub const MAX_DECODED_MIB: usize = 16;
    pub const DECODE_MEMORY_MIB: usize = 32;
    /// Real pods have a handful; Kubernetes sets no limit of its own.
    pub const MAX_CONTAINERS: usize = 256;
    pub const MAX_VOLUMES: usize = 1024;
}

impl Limits {
    /// The connection table's share of these bounds.
    pub fn connections(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        use defaults::*;
        Self {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: Duration::from_secs(HANDSHAKE_TIMEOUT_SECONDS),
            request_timeout: Duration::from_secs(REQUEST_TIMEOUT_SECONDS),
            idle_timeout: Duration::from_secs(IDLE_TIMEOUT_SECONDS),
            max_body_bytes: MAX_BODY_MIB * MIB,
            body_memory_bytes: BODY_MEMORY_MIB * MIB,
            max_decoded_bytes: MAX_DECODED_MIB * MIB,
            decode_memory_bytes: DECODE_MEMORY_MIB * MIB,
            max_containers: MAX_CONTAINERS,
            max_volumes: MAX_VOLUMES,
        }
    }
}

impl Limits {
    /// Refuses settings that could never admit a pod, naming the flag to fix.
    pub fn validate(&self) -> Result<(), Error> {
        let check = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(Error::BadLimits(what.to_string()))
            }
        };
        check(
            self.max_connections > 0,
            "--max-connections must be at least 1",
        )?;
        check(
            self.body_memory_bytes >= self.max_body_bytes,
            "--body-memory-mib must be at least --max-body-mib, or a largest request could never be read",
        )?;
        check(
            self.decode_memory_bytes >= self.max_decoded_bytes,
            "--decode-memory-mib must be at least --max-decoded-mib, or a largest review could never be decoded",
        )?;
        check(
            !self.request_timeout.is_zero() && !self.handshake_timeout.is_zero(),
            "--request-timeout-seconds and --handshake-timeout-seconds must be positive",
        )?;
        Ok(())
    }
}

/// What [`inspect_review`] learnt about a review without decoding it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReviewShape {
    /// `apiVersion` and `kind` of the review, to answer in kind.
    pub api_version: Option<String>,
    pub kind: Option<String>,
    /// `request.uid` and `request.namespace`.
    pub uid: Option<String>,
    pub namespace: Option<String>,
    /// Containers, init containers and ephemeral containers of the pod (and of `oldObject`).
    pub containers: usize,
    /// Volumes of the pod (and of `oldObject`).
    pub volumes: usize,
    /// An upper estimate of the heap the decoded review takes.
    pub estimated_bytes: usize,
}

impl ReviewShape {
    /// The refusal for a review beyond `limits`, if it is.
    pub fn check(&self, limits: &Limits) -> Result<(), Error> {
        if self.containers > limits.max_containers {
            return Err(Error::PodTooLarge(format!(
                "the pod has {} containers (containers, initContainers and ephemeralContainers \
                 together), more than the {} rolemesh's webhook accepts (--max-containers)",
                self.containers, limits.max_containers
            )));
        }
        if self.volumes > limits.max_volumes {
            return Err(Error::PodTooLarge(format!(
                "the pod has {} volumes, more than the {} rolemesh's webhook accepts \
                 (--max-volumes)",
                self.volumes, limits.max_volumes
            )));
        }
        if self.estimated_bytes > limits.max_decoded_bytes {
            return Err(Error::PodTooLarge(format!(
                "the review would take about {} MiB of memory to decode, more than the {} MiB \
                 rolemesh's webhook accepts (--max-decoded-mib)",
                self.estimated_bytes.div_ceil(MIB),
                limits.max_decoded_bytes / MIB
            )));
        }
        Ok(())
    }
}

/// Walks the raw JSON of a review once, allocating nothing but the few strings it keeps, and
/// returns its shape; fails on anything that is not well-formed JSON (or nests deeper than
/// serde_json's recursion limit), so later decoding only ever sees a body already measured.
pub fn inspect_review(body: &[u8]) -> Result<ReviewShape, serde_json::Error> {
    let mut shape = ReviewShape::default();
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    Node {
        shape: &mut shape,
        place: Place::Root,
        key: Key::Other,
        element: None,
    }
    .deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(shape)
}

// What the estimate charges. serde_json's `Value` (used for the request's `options` and the
// pod's `managedFields[].fieldsV1`) takes 32 bytes per value and a B-tree node of 640 to 730
// bytes per non-empty object; typed fields take less. An object in an array is charged as the
// largest type it may decode into there (see `Key::element_size`), and vectors grow by doubling
// while decoding, so every array element is charged twice. `the_estimate_bounds_what_decoding_
// takes` (tests/limits.rs) checks the estimate against what decoding really takes.
const SCALAR: usize = 32;
const STRING: usize = 24;
const ARRAY: usize = 24;
const OBJECT: usize = 32;
const NON_EMPTY_OBJECT: usize = 704;
/// A member's key and value in a B-tree node, and its key's own allocation.
const MEMBER: usize = 96;

/// Where in the review a value is, as far as the shape cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Root,
    Request,
    Object,
    Spec,
    Elsewhere,
}

/// The member name a value is under, when it matters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    ApiVersion,
    Kind,
    Request,
    Uid,
    Namespace,
    Object,
    OldObject,
    Spec,
    Containers,
    EphemeralContainers,
    Volumes,
    Other,
}

impl Key {
    fn from_name(name: &str) -> Self {
        match name {
            "apiVersion" => Self::ApiVersion,
            "kind" => Self::Kind,
            "request" => Self::Request,
            "uid" => Self::Uid,
            "namespace" => Self::Namespace,
            "object" => Self::Object,
            "oldObject" => Self::OldObject,
            "spec" => Self::Spec,
            "containers" | "initContainers" => Self::Containers,
            "ephemeralContainers" => Self::EphemeralContainers,
            "volumes" => Self::Volumes,
            _ => Self::Other,
        }
    }

    /// The decoded size of one object in an array under this key: the pod's containers and
    /// volumes by their types, any other by the largest of the types the pod's other arrays
    /// hold (a projected volume source, an environment variable, an affinity term, ...).
    fn element_size(self) -> usize {
        match self {
            Self::Containers => size_of::<Container>(),
            Self::EphemeralContainers => size_of::<EphemeralContainer>(),
            Self::Volumes => size_of::<Volume>(),
            _ => [
                size_of::<VolumeProjection>(),
                size_of::<EnvVar>(),
                size_of::<WeightedPodAffinityTerm>(),
                size_of::<TopologySpreadConstraint>(),
                size_of::<VolumeMount>(),
            ]
            .into_iter()
            .max()
            .unwrap_or(0),
        }
    }
}

struct KeySeed;

/// A member name: what it means here, and its length.
impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = (Key, usize);

    fn deserialize<D: de::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<(Key, usize), D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = (Key, usize);

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_str<E: de::Error>(self, name: &str) -> Result<(Key, usize), E> {
        Ok((Key::from_name(name), name.len()))
    }
}

struct Node<'a> {
    shape: &'a mut ReviewShape,
    place: Place,
    key: Key,
    /// For an element of an array: the decoded size of an object there.
    element: Option<usize>,
}

impl Node<'_> {
    fn charge(&mut self, bytes: usize) {
        self.shape.estimated_bytes = self.shape.estimated_bytes.saturating_add(bytes);
    }

    /// What an array element costs as a vector slot, beyond its own contents.
    fn charge_slot(&mut self, object: bool) {
        if let Some(size) = self.element {
            let slot = if object { size } else { SCALAR };
            self.charge(2 * slot);
        }
    }

    fn keep(&mut self, text: &str) {
        let slot = match (self.place, self.key) {
            (Place::Root, Key::ApiVersion) => &mut self.shape.api_version,
            (Place::Root, Key::Kind) => &mut self.shape.kind,
            (Place::Request, Key::Uid) => &mut self.shape.uid,
            (Place::Request, Key::Namespace) => &mut self.shape.namespace,
            _ => return,
        };
        *slot = Some(text.to_string());
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(mut self, _: bool) -> Result<(), E> {
        self.charge_slot(false);
        self.charge(SCALAR);
        Ok(())
    }

    fn visit_i64<E: de::Error>(mut self, _: i64) -> Result<(), E> {
        self.charge_slot(false);
        self.charge(SCALAR);
        Ok(())
    }

    fn visit_u64<E: de::Error>(mut self, _: u64) -> Result<(), E> {
        self.charge_slot(false);
        self.charge(SCALAR);
        Ok(())
    }

    fn visit_f64<E: de::Error>(mut self, _: f64) -> Result<(), E> {
        self.charge_slot(false);
        self.charge(SCALAR);
        Ok(())
    }

    fn visit_unit<E: de::Error>(mut self) -> Result<(), E> {
        self.charge_slot(false);
        self.charge(SCALAR);
        Ok(())
    }

    fn visit_str<E: de::Error>(mut self, text: &str) -> Result<(), E> {
        self.charge_slot(false);
        self.charge(STRING + SCALAR + text.len());
        self.keep(text);
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.charge_slot(false);
        self.charge(ARRAY);
        let element = Some(self.key.element_size());
        let mut count = 0usize;
        while seq
            .next_element_seed(Node {
                shape: &mut *self.shape,
                place: Place::Elsewhere,
                key: Key::Other,
                element,
            })?
            .is_some()
        {
            count += 1;
        }
        if self.place == Place::Spec {
            match self.key {
                Key::Containers | Key::EphemeralContainers => self.shape.containers += count,
                Key::Volumes => self.shape.volumes += count,
                _ => {}
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.charge_slot(true);
        self.charge(OBJECT);
        let mut members = 0usize;
        while let Some((key, length)) = map.next_key_seed(KeySeed)? {
            members += 1;
            self.charge(length);
            let place = match (self.place, key) {
                (Place::Root, Key::Request) => Place::Request,
                (Place::Root, Key::ApiVersion | Key::Kind) => Place::Root,
                (Place::Request, Key::Object | Key::OldObject) => Place::Object,
                (Place::Request, Key::Uid | Key::Namespace) => Place::Request,
                (Place::Object, Key::Spec) => Place::Spec,
                (Place::Spec, Key::Containers | Key::EphemeralContainers | Key::Volumes) => {
                    Place::Spec
                }
                _ => Place::Elsewhere,
            };
            map.next_value_seed(Node {
                shape: &mut *self.shape,
                place,
                key,
                element: None,
            })?;
        }
        if members > 0 {
            self.charge(NON_EMPTY_OBJECT + members * MEMBER);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(object: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "namespace": "shop",
                "kind": { "group": "", "version": "v1", "kind": "Pod" },
                "object": object,
            },
        }))
        .expect("encode")
    }

    #[test]
    fn the_shape_names_the_review_and_counts_containers_and_volumes() {
        let body = review(json!({
            "metadata": { "name": "p", "namespace": "elsewhere", "uid": "not-the-request" },
            "spec": {
                "containers": [{ "name": "a" }, { "name": "b" }],
                "initContainers": [{ "name": "i" }],
                "ephemeralContainers": [{ "name": "e" }],
                "volumes": [{ "name": "v" }, {}, {}],
            },
        }));
        let shape = inspect_review(&body).expect("well-formed");
        assert_eq!(shape.api_version.as_deref(), Some("admission.k8s.io/v1"));
        assert_eq!(shape.kind.as_deref(), Some("AdmissionReview"));
        assert_eq!(shape.uid.as_deref(), Some("u-1"));
        assert_eq!(shape.namespace.as_deref(), Some("shop"));
        assert_eq!((shape.containers, shape.volumes), (4, 3));
        assert!(shape.check(&Limits::default()).is_ok());
    }

    #[test]
    fn only_the_pods_own_lists_count() {
        // "containers" elsewhere (an annotation-like map, a nested object) is not the pod's.
        let body = review(json!({
            "metadata": { "labels": { "containers": "x" } },
            "spec": { "affinity": { "containers": [{}, {}, {}] } },
        }));
        let shape = inspect_review(&body).expect("well-formed");
        assert_eq!((shape.containers, shape.volumes), (0, 0));
    }

    #[test]
    fn empty_containers_beyond_the_limit_are_refused_by_name() {
        let containers: Vec<_> = (0..300).map(|_| json!({})).collect();
        let body = review(json!({ "spec": { "containers": containers } }));
        let shape = inspect_review(&body).expect("well-formed");
        let error = shape
            .check(&Limits::default())
            .expect_err("too many containers");
        let message = error.to_string();
        assert!(
            message.contains("300 containers") && message.contains("--max-containers"),
            "{message}"
        );
    }

    #[test]
    fn a_body_that_expands_in_decoding_is_refused_by_its_estimate() {
        // Projected volume sources are not counted, but each `{}` is a struct of hundreds of
        // bytes once decoded.
        let sources: Vec<_> = (0..100_000).map(|_| json!({})).collect();
        let body =
            review(json!({ "spec": { "volumes": [{ "projected": { "sources": sources } }] } }));
        let shape = inspect_review(&body).expect("well-formed");
        assert!(
            shape.estimated_bytes > 100_000 * size_of::<VolumeProjection>(),
            "{shape:?}"
        );
        let message = shape
            .check(&Limits::default())
            .expect_err("too large")
            .to_string();
        assert!(message.contains("--max-decoded-mib"), "{message}");
    }

    #[test]
    fn malformed_json_is_an_error_not_a_shape() {
        assert!(inspect_review(b"{\"request\": [1, 2").is_err());
        assert!(inspect_review(b"{} trailing").is_err());
        let deep = "[".repeat(1000) + &"]".repeat(1000);
        assert!(inspect_review(deep.as_bytes()).is_err(), "recursion limit");
    }

    #[test]
    fn the_default_limits_are_consistent_and_bad_ones_are_named() {
        assert!(Limits::default().validate().is_ok());
        let bad = Limits {
            body_memory_bytes: MIB,
            ..Limits::default()
        };
        let message = bad.validate().expect_err("inconsistent").to_string();
        assert!(message.contains("--body-memory-mib"), "{message}");
    }
}

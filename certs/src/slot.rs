//! A slot holds the current good version of one piece of TLS material and swaps it
//! atomically when a reload succeeds.
//!
//! Handshakes read a slot with one `ArcSwap` load and never block on a reload. A reload
//! builds the new material completely (read, parse, validate) *before* swapping, so a bad
//! update can only fail the reload, never a handshake: the previous material keeps serving.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use sluice_config::model::Secret;

use crate::error::CertError;
use crate::source::{InputRecorder, Inputs};
use crate::status::MaterialStatus;

/// A kind of TLS material that can live in a [`Slot`].
pub(crate) trait Material: Sized + Send + Sync + 'static {
    /// What the configuration says (a certificate reference, a validation context, ...).
    type Spec: Clone + PartialEq + fmt::Debug + Send + Sync + 'static;

    /// The kind, as shown in logs and on the admin endpoint.
    const KIND: &'static str;

    /// A short name for the material: the SDS secret name or the file it comes from.
    fn name(spec: &Self::Spec) -> String;

    /// Where the material comes from, for the admin endpoint.
    fn source(spec: &Self::Spec) -> String;

    /// Reads and validates the material. Must not have side effects beyond reading.
    fn load(spec: &Self::Spec, rec: &mut InputRecorder<'_>, provider: &Arc<CryptoProvider>) -> Result<Self, CertError>;

    /// Admin status entries for this material.
    fn status(&self, name: &str, source: &str) -> Vec<MaterialStatus>;
}

pub(crate) enum Reload {
    /// The inputs are byte-for-byte what is already serving.
    Unchanged,
    Reloaded,
    Failed(CertError),
}

struct SlotState {
    inputs: Inputs,
    last_error: Option<String>,
}

pub(crate) struct Slot<M: Material> {
    pub spec: M::Spec,
    pub name: String,
    current: ArcSwap<M>,
    /// Bumped on every successful swap; configs that snapshot derived data (the CA names a
    /// server sends in its certificate request) compare it to know when to rebuild.
    version: AtomicU64,
    /// Held for the whole duration of a reload, so that reloads of one slot (file watcher
    /// and secret updates) are serialised.
    state: Mutex<SlotState>,
}

impl<M: Material> Slot<M> {
    /// Loads `spec` for the first time.
    pub fn load(
        spec: &M::Spec,
        secrets: &BTreeMap<String, Arc<Secret>>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Arc<Slot<M>>, CertError> {
        let mut rec = InputRecorder::new(secrets);
        let material = M::load(spec, &mut rec, provider)?;
        Ok(Arc::new(Slot {
            spec: spec.clone(),
            name: M::name(spec),
            current: ArcSwap::from_pointee(material),
            version: AtomicU64::new(0),
            state: Mutex::new(SlotState { inputs: rec.finish(), last_error: None }),
        }))
    }

    /// The material serving now.
    #[inline]
    pub fn current(&self) -> arc_swap::Guard<Arc<M>> {
        self.current.load()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub fn inputs(&self) -> Inputs {
        self.lock().inputs.clone()
    }

    pub fn last_error(&self) -> Option<String> {
        self.lock().last_error.clone()
    }

    /// Re-reads the material. On failure the current material stays in place.
    pub fn reload(&self, secrets: &BTreeMap<String, Arc<Secret>>, provider: &Arc<CryptoProvider>) -> Reload {
        let mut state = self.lock();
        let mut rec = InputRecorder::new(secrets);
        match M::load(&self.spec, &mut rec, provider) {
            Err(e) => {
                state.last_error = Some(e.to_string());
                Reload::Failed(e)
            }
            Ok(material) => {
                let inputs = rec.finish();
                state.last_error = None;
                if inputs.fingerprint == state.inputs.fingerprint {
                    // Keep the newer dependency lists (e.g. a symlink now pointing elsewhere).
                    state.inputs = inputs;
                    return Reload::Unchanged;
                }
                self.current.store(Arc::new(material));
                self.version.fetch_add(1, Ordering::AcqRel);
                state.inputs = inputs;
                Reload::Reloaded
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<M: Material> fmt::Debug for Slot<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("kind", &M::KIND).field("name", &self.name).finish()
    }
}

/// The slots of one material kind, by spec. Weak references: a slot lives as long as a
/// configuration uses it.
pub(crate) struct Registry<M: Material> {
    slots: Mutex<Vec<std::sync::Weak<Slot<M>>>>,
}

impl<M: Material> Default for Registry<M> {
    fn default() -> Self {
        Registry { slots: Mutex::new(Vec::new()) }
    }
}

impl<M: Material> Registry<M> {
    /// The live slot for `spec`, loading it if there is none. The boolean is true when the
    /// slot was created by this call.
    pub fn get_or_load(
        &self,
        spec: &M::Spec,
        secrets: &BTreeMap<String, Arc<Secret>>,
        provider: &Arc<CryptoProvider>,
    ) -> Result<(Arc<Slot<M>>, bool), CertError> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|w| w.strong_count() > 0);
        if let Some(slot) = slots.iter().filter_map(std::sync::Weak::upgrade).find(|s| s.spec == *spec) {
            return Ok((slot, false));
        }
        let slot = Slot::load(spec, secrets, provider)?;
        slots.push(Arc::downgrade(&slot));
        Ok((slot, true))
    }

    /// All live slots.
    pub fn live(&self) -> Vec<Arc<Slot<M>>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|w| w.strong_count() > 0);
        slots.iter().filter_map(std::sync::Weak::upgrade).collect()
    }
}

//! Output variables: `##octopus[setVariable name='...' value='...']` lines a
//! machine's part of a task printed (the protocol is `octo_calamari`'s
//! `service_message`, documented in docs/calamari.md).
//!
//! They are read from the step's stored log when the step ends, so lines
//! received before a lost connection or a server restart count too. Values
//! marked `sensitive='True'` are masked in the stored log as they arrive
//! ([`mask_sensitive`]) and recorded masked.

use octo_calamari::service_message::{self, ServiceMessage};
use octo_store::{Store, TaskStep};

/// What a sensitive value is replaced with.
pub(crate) use crate::secrets::MASK;

/// Fills `step.output_variables` from the step's stored log (best effort: a
/// store failure is logged and leaves them as they were).
pub(crate) async fn collect(store: &dyn Store, step: &mut TaskStep) {
    let lines = match store.step_log(&step.task_id, step.machine_id).await {
        Ok(l) => l,
        Err(e) => {
            return tracing::error!(
                "reading the log of {} in task {} for output variables: {e}",
                step.machine_name,
                step.task_id
            )
        }
    };
    for line in lines.iter().filter(|l| l.stream == "stdout") {
        if let Some(ServiceMessage::SetVariable {
            name,
            value,
            sensitive,
        }) = service_message::parse(&line.text)
        {
            let value = if sensitive { MASK.to_string() } else { value };
            step.output_variables.insert(name, value);
        }
    }
}

/// For a sensitive setVariable line: its value (to mask from then on) and the
/// line to store, with the value masked; None for any other line.
pub(crate) fn sensitive_value(text: &str) -> Option<(String, String)> {
    match service_message::parse(text)? {
        ServiceMessage::SetVariable {
            name,
            value,
            sensitive: true,
        } => Some((
            value,
            service_message::format(&ServiceMessage::SetVariable {
                name,
                value: MASK.into(),
                sensitive: true,
            }),
        )),
        _ => None,
    }
}

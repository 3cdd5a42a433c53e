//! MQTT topic names (CONTRACT.md §2): `vehicles/{vehicle_id}/location|diagnostic|frames`.
//!
//! The topic names the vehicle and, except for `frames` (a mixed batch), the kind of every frame
//! in the message. Topics of received messages never carry the `$share/{group}/` prefix of a
//! shared subscription, but one is tolerated and stripped.

use crate::frame::Kind;

/// A parsed MQTT topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub vehicle_id: String,
    /// The topic's kind; `None` for `vehicles/{id}/frames`, where each frame carries its own.
    pub kind: Option<Kind>,
}

/// Parses `vehicles/{id}/location|diagnostic|frames`; `None` for anything else.
pub fn parse_topic(topic: &str) -> Option<Topic> {
    split_topic(topic).map(|(vehicle_id, kind)| Topic { vehicle_id: vehicle_id.to_owned(), kind })
}

/// [`parse_topic`] without allocating: the vehicle id borrows from `topic`.
pub(crate) fn split_topic(topic: &str) -> Option<(&str, Option<Kind>)> {
    let topic = match topic.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/')?.1,
        None => topic,
    };
    let rest = topic.strip_prefix("vehicles/")?;
    let (vehicle_id, kind) = rest.split_once('/')?;
    if vehicle_id.is_empty() || vehicle_id.contains(['+', '#']) {
        return None;
    }
    let kind = match kind {
        "location" => Some(Kind::Location),
        "diagnostic" => Some(Kind::Diagnostic),
        "frames" => None,
        _ => return None,
    };
    Some((vehicle_id, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_topic_forms_parse() {
        let t = |id: &str, kind| Some(Topic { vehicle_id: id.to_owned(), kind });
        assert_eq!(parse_topic("vehicles/V1/location"), t("V1", Some(Kind::Location)));
        assert_eq!(parse_topic("vehicles/V1/diagnostic"), t("V1", Some(Kind::Diagnostic)));
        assert_eq!(parse_topic("vehicles/V1/frames"), t("V1", None));
        assert_eq!(parse_topic("$share/g/vehicles/V1/frames"), t("V1", None));
    }

    #[test]
    fn other_topics_are_refused() {
        for s in [
            "",
            "vehicles",
            "vehicles/",
            "vehicles//location",
            "vehicles/V1",
            "vehicles/V1/",
            "vehicles/V1/speed",
            "vehicles/V1/location/",
            "vehicles/V1/x/location",
            "vehicles/+/location",
            "vehicles/#",
            "fleet/V1/location",
            "/vehicles/V1/location",
            "$share/vehicles/V1/location",
        ] {
            assert_eq!(parse_topic(s), None, "{s:?}");
        }
    }
}

//! The in-memory frame: one reading from one vehicle at one moment.
//!
//! Every codec (JSON, Protobuf) decodes into [`Frame`], every sink writes from it. Field names
//! follow the contract's JSON names (CONTRACT.md §1); a field the vehicle did not send is `None`,
//! never a made-up zero.

use std::fmt;

/// Microseconds since the Unix epoch, UTC. Event times (`ts`) and receive times use it.
pub type Micros = i64;

/// Position of a record in fleetpipe's write-ahead log. Monotonic, starts at 1.
pub type Lsn = u64;

/// The two frame kinds of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Location,
    Diagnostic,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Location, Kind::Diagnostic];

    /// The contract's name, as used in JSON, topics and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Location => "location",
            Kind::Diagnostic => "diagnostic",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "location" => Some(Kind::Location),
            "diagnostic" => Some(Kind::Diagnostic),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One decoded, validated frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub vehicle_id: String,
    /// Event time: the vehicle's clock.
    pub ts: Micros,
    /// Device counter; 0 when the frame carried none (the contract stores 0, not NULL).
    pub seq: u64,
    /// When fleetpipe received the message that carried this frame.
    pub received_at: Micros,
    pub body: Body,
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self.body {
            Body::Location(_) => Kind::Location,
            Body::Diagnostic(_) => Kind::Diagnostic,
        }
    }

    /// The contract's frame identity `(vehicle_id, kind, ts, seq)`.
    pub fn identity(&self) -> (&str, Kind, Micros, u64) {
        (&self.vehicle_id, self.kind(), self.ts, self.seq)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Location(Location),
    Diagnostic(Box<Diagnostic>),
}

/// Location fields (units follow COVESA VSS).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Location {
    pub lat: f64,
    pub lon: f64,
    pub speed_kmh: Option<f64>,
    pub heading_deg: Option<f64>,
    pub alt_m: Option<f64>,
    pub accuracy_m: Option<f64>,
    pub satellites: Option<u32>,
    pub odometer_m: Option<f64>,
    pub ignition: Option<bool>,
}

/// The range a measure must lie in (CONTRACT.md §1), checked by [`crate::validate`]. Every range
/// also excludes NaN and the infinities.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    Finite,
    /// `>= 0`.
    NonNegative,
    /// `lo..=hi`.
    Closed(f64, f64),
    /// `lo..hi`.
    HalfOpen(f64, f64),
}

/// An optional numeric field of a frame body: its contract name — also its JSON key and its
/// column in Parquet and Postgres —, its range, and how to read and write it. Codecs, column
/// layouts, validation and the L1 packing iterate [`Diagnostic::MEASURES`] instead of spelling
/// the fields out each.
#[derive(Clone, Copy)]
pub struct Measure<B> {
    pub name: &'static str,
    pub range: Range,
    pub get: fn(&B) -> Option<f64>,
    pub set: fn(&mut B, Option<f64>),
}

impl<B> fmt::Debug for Measure<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Measure").field("name", &self.name).field("range", &self.range).finish()
    }
}

macro_rules! measures {
    ($body:ty; $($field:ident: $range:expr),* $(,)?) => {
        [$(Measure::<$body> {
            name: stringify!($field),
            range: $range,
            get: |b| b.$field,
            set: |b, v| b.$field = v,
        }),*]
    };
}

impl Diagnostic {
    /// The diagnostic measures, in the contract's order (the order of the JSON encoding and of
    /// the Parquet and Postgres columns, after `received_at` and before `mil_on`).
    pub const MEASURES: [Measure<Diagnostic>; 8] = measures!(Diagnostic;
        engine_rpm: Range::NonNegative,
        coolant_temp_c: Range::Finite,
        engine_load_pct: Range::Closed(0.0, 100.0),
        fuel_level_pct: Range::Closed(0.0, 100.0),
        battery_soc_pct: Range::Closed(0.0, 100.0),
        battery_v: Range::Finite,
        engine_hours: Range::Finite,
        odometer_m: Range::Finite,
    );

    /// Whether the frame says anything: a measure, `mil_on`, `dtcs` (even empty) or `signals`.
    pub fn is_empty(&self) -> bool {
        Self::MEASURES.iter().all(|m| (m.get)(self).is_none())
            && self.mil_on.is_none()
            && self.dtcs.is_none()
            && self.signals.is_none()
    }
}

/// Diagnostic fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnostic {
    pub engine_rpm: Option<f64>,
    pub coolant_temp_c: Option<f64>,
    pub engine_load_pct: Option<f64>,
    pub fuel_level_pct: Option<f64>,
    pub battery_soc_pct: Option<f64>,
    pub battery_v: Option<f64>,
    pub engine_hours: Option<f64>,
    pub odometer_m: Option<f64>,
    pub mil_on: Option<bool>,
    /// `None` when the frame carried no `dtcs`; `Some(vec![])` for an explicit empty list.
    pub dtcs: Option<Vec<Dtc>>,
    /// The `signals` bag as canonical JSON object text (`{"Vehicle.X":1,...}`), validated.
    pub signals: Option<String>,
}

/// A diagnostic trouble code: OBD-II/UDS string or J1939 SPN/FMI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dtc {
    /// Matches `^[PCBU][0-3][0-9A-F]{3}(-?[0-9A-F]{2})?$`.
    Obd(String),
    J1939 {
        spn: u32,
        fmi: u8,
        oc: u8,
        sa: u8,
    },
}

/// Where a message came from; kept with rejections and used to pick topic rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// MQTT message on `topic`.
    Mqtt { topic: String },
    /// HTTP `POST /v1/frames`.
    Http,
    /// Kafka record.
    Kafka { topic: String, partition: i32, offset: i64 },
    /// A Teltonika tracker's AVL packet (TCP or UDP); `imei` is empty before the handshake.
    Teltonika { imei: String },
    /// A frame fleetpipe had accepted, refused later by this sink (a value its store cannot
    /// hold); the frame's own source is not kept in the log.
    Sink { sink: String },
}

impl Origin {
    /// Short source label (`mqtt`, `http`, `kafka`, or the refusing sink's name).
    pub fn source(&self) -> &str {
        match self {
            Origin::Mqtt { .. } => "mqtt",
            Origin::Http => "http",
            Origin::Kafka { .. } => "kafka",
            Origin::Teltonika { .. } => "teltonika",
            Origin::Sink { sink } => sink,
        }
    }
}

/// Declares [`Reason`] with each variant's code (its metric label and dead-letter `reason`)
/// once, for `code`, `from_code` and the list of all.
macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $code:literal,)*) => {
        /// Why a frame (or a whole payload) was refused. The `code` is the metric label.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason.
            pub const ALL: &'static [Reason] = &[$(Reason::$variant,)*];

            pub fn code(self) -> &'static str {
                match self {
                    $(Reason::$variant => $code,)*
                }
            }
        }
    };
}

reasons! {
    /// Not JSON at all, or truncated JSON.
    MalformedJson => "malformed_json",
    /// JSON, but a field has the wrong type or the frame is not an object.
    InvalidField => "invalid_field",
    /// Undecodable Protobuf (truncated, wrong wire types).
    MalformedProtobuf => "malformed_protobuf",
    /// A Teltonika packet that does not decode: wrong CRC, truncated, a length that lies, an
    /// unknown codec, a record count that disagrees with the records.
    MalformedTeltonika => "malformed_teltonika",
    /// A required field is missing (`vehicle_id`, `ts`, `kind`, `lat`, `lon`).
    MissingField => "missing_field",
    InvalidVehicleId => "invalid_vehicle_id",
    /// A unknown `kind` value, or one that disagrees with the MQTT topic.
    InvalidKind => "invalid_kind",
    /// A value outside the contract's range (lat, lon, heading, percentages, ...).
    OutOfRange => "out_of_range",
    /// `lat == 0 && lon == 0`: the device had no fix.
    NoFix => "no_fix",
    InvalidDtc => "invalid_dtc",
    InvalidSignals => "invalid_signals",
    InvalidTs => "invalid_ts",
    /// `ts` further ahead of the receiving clock than allowed.
    FutureTs => "future_ts",
    /// `ts` older than the optional lower bound.
    PastTs => "past_ts",
    /// The topic's vehicle id differs from the payload's.
    SpoofedVehicle => "spoofed_vehicle",
    /// Payload larger than the configured maximum.
    Oversized => "oversized",
    /// The MQTT topic does not follow `vehicles/{id}/{location|diagnostic|frames}`.
    InvalidTopic => "invalid_topic",
    /// A content type fleetpipe does not read.
    UnsupportedContentType => "unsupported_content_type",
    /// A vehicle's credential does not cover the MQTT topic it published to.
    UnauthorizedTopic => "unauthorized_topic",
    /// An HTTP token's scope does not cover the frame's vehicle.
    UnauthorizedVehicle => "unauthorized_vehicle",
    /// An empty payload, a message that holds no frame, or a diagnostic frame without any
    /// diagnostic field.
    EmptyFrame => "empty_frame",
    /// More frames in one message than `validate.max_frames_per_message`: the excess.
    TooManyFrames => "too_many_frames",
}

impl Reason {
    pub fn from_code(code: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.code() == code)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// At most 64 characters of `s`, for echoing untrusted input in a rejection's detail.
pub(crate) fn snippet(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((end, _)) => format!("{:?}…", s.get(..end).unwrap_or_default()),
        None => format!("{s:?}"),
    }
}

/// A refused frame or payload, kept in the dead-letter store.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub reason: Reason,
    /// Human-readable detail (serde's message, the offending value, ...).
    pub detail: String,
    /// Position of the frame in its message (0-based), `None` when the whole payload was refused.
    pub index: Option<u32>,
    /// The bytes of the refused frame (or of the whole payload when it could not be split).
    pub raw: bytes::Bytes,
    pub origin: Origin,
    pub received_at: Micros,
}

/// What decoding and validating one message produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Decoded {
    pub frames: Vec<Frame>,
    pub rejections: Vec<Rejection>,
    /// How many frames the message held, good and bad (for `frames_received_total`).
    pub received: u32,
}

//! The synthetic data: Patients, two Observations each, and one Group of them all. Every
//! value derives from the Patient's number, so the data are the same on every run.

use super::mix;
use serde::Serialize;

/// A FHIR resource the API serves.
pub(super) trait Resource: Serialize {
    /// The resource type, as in URLs and `resourceType`.
    const TYPE: &'static str;

    fn id(&self) -> &str;

    /// Whether the resource matches the search parameter `name=value`, or `None` if its type
    /// has no such parameter: Blaze ignores those, as it ignores `_format` and
    /// `researchstudy` here.
    fn matches(&self, name: &str, value: &str) -> Option<bool> {
        (name == "_id").then(|| matches_id(self.id(), value))
    }
}

/// `_id`: comma-separated alternatives.
fn matches_id(id: &str, value: &str) -> bool {
    value.split(',').any(|wanted| wanted == id)
}

/// Everything the API serves. Every research study sees the same.
pub(super) struct Dataset {
    pub(super) patients: Vec<Patient>,
    pub(super) observations: Vec<Observation>,
    pub(super) groups: Vec<Group>,
}

impl Dataset {
    pub(super) fn generate(patients: usize) -> Self {
        let patients: Vec<Patient> = (1..=patients).map(Patient::generate).collect();
        let observations = patients
            .iter()
            .enumerate()
            .flat_map(|(index, patient)| {
                let draw = mix(patient.seed);
                [&PLATELETS, &NEUTROPHILS]
                    .into_iter()
                    .enumerate()
                    .map(move |(test, lab)| {
                        Observation::generate(2 * index + test + 1, patient, lab, draw)
                    })
            })
            .collect();
        let groups = vec![Group::of_all(&patients)];
        Self {
            patients,
            observations,
            groups,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Patient {
    resource_type: &'static str,
    id: String,
    name: [HumanName; 1],
    gender: &'static str,
    birth_date: String,
    /// Where this Patient's values come from.
    #[serde(skip)]
    seed: u64,
}

#[derive(Serialize)]
struct HumanName {
    family: &'static str,
    given: [&'static str; 1],
}

const GIVEN_NAMES: [&str; 16] = [
    "Ada",
    "Grace",
    "Alan",
    "Katherine",
    "Edsger",
    "Barbara",
    "Donald",
    "Frances",
    "John",
    "Margaret",
    "Dennis",
    "Radia",
    "Ken",
    "Shafi",
    "Tim",
    "Hedy",
];

const FAMILY_NAMES: [&str; 16] = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Johnson",
    "Dijkstra",
    "Liskov",
    "Knuth",
    "Allen",
    "Backus",
    "Hamilton",
    "Ritchie",
    "Perlman",
    "Thompson",
    "Goldwasser",
    "Berners-Lee",
    "Lamarr",
];

impl Patient {
    /// Patient number `number`, counting from 1.
    fn generate(number: usize) -> Self {
        let seed = mix(number as u64);
        let pick = |shift: u32, n: u64| ((seed >> shift) % n) as usize;
        let gender = match pick(0, 16) {
            0 => "other",
            n if n % 2 == 0 => "female",
            _ => "male",
        };
        Self {
            resource_type: Self::TYPE,
            id: format!("p-{number:04}"),
            name: [HumanName {
                family: FAMILY_NAMES[pick(8, 16)],
                given: [GIVEN_NAMES[pick(16, 16)]],
            }],
            gender,
            birth_date: format!(
                "{:04}-{:02}-{:02}",
                1935 + pick(24, 70),
                1 + pick(32, 12),
                1 + pick(40, 28)
            ),
            seed,
        }
    }

    fn reference(&self) -> Reference {
        Reference {
            reference: format!("Patient/{}", self.id),
        }
    }
}

impl Resource for Patient {
    const TYPE: &'static str = "Patient";

    fn id(&self) -> &str {
        &self.id
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Observation {
    resource_type: &'static str,
    id: String,
    status: &'static str,
    category: [CodeableConcept; 1],
    code: CodeableConcept,
    subject: Reference,
    effective_date_time: String,
    value_quantity: Quantity,
}

#[derive(Serialize)]
struct CodeableConcept {
    coding: [Coding; 1],
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'static str>,
}

#[derive(Serialize)]
struct Coding {
    system: &'static str,
    code: &'static str,
    display: &'static str,
}

impl Coding {
    /// FHIR token search: `system|code`, `system|` (any code of the system), or `code` (of
    /// any system). Exact matches only.
    fn matches(&self, token: &str) -> bool {
        match token.split_once('|') {
            Some((system, "")) => system == self.system,
            Some((system, code)) => system == self.system && code == self.code,
            None => token == self.code,
        }
    }
}

#[derive(Serialize)]
struct Reference {
    reference: String,
}

#[derive(Serialize)]
struct Quantity {
    value: f64,
    unit: &'static str,
    system: &'static str,
    code: &'static str,
}

/// A blood count the Observations report.
struct LabTest {
    code: &'static str,
    display: &'static str,
    /// Results lie in `low..=high`, in tenths of the unit.
    low_tenths: u64,
    high_tenths: u64,
}

const LOINC: &str = "http://loinc.org";

const PLATELETS: LabTest = LabTest {
    code: "777-3",
    display: "Platelets [#/volume] in Blood by Automated count",
    low_tenths: 1500,
    high_tenths: 4500,
};

const NEUTROPHILS: LabTest = LabTest {
    code: "751-8",
    display: "Neutrophils [#/volume] in Blood by Automated count",
    low_tenths: 15,
    high_tenths: 80,
};

impl Observation {
    /// Observation number `number` (from 1) of `patient`, for the blood drawn at `draw`.
    fn generate(number: usize, patient: &Patient, lab: &LabTest, draw: u64) -> Self {
        let pick = |shift: u32, n: u64| (draw >> shift) % n;
        let tenths =
            lab.low_tenths + mix(draw ^ number as u64) % (lab.high_tenths - lab.low_tenths + 1);
        Self {
            resource_type: Self::TYPE,
            id: format!("o-{number:04}"),
            status: "final",
            category: [CodeableConcept {
                coding: [Coding {
                    system: "http://terminology.hl7.org/CodeSystem/observation-category",
                    code: "laboratory",
                    display: "Laboratory",
                }],
                text: None,
            }],
            code: CodeableConcept {
                coding: [Coding {
                    system: LOINC,
                    code: lab.code,
                    display: lab.display,
                }],
                text: Some(lab.display),
            },
            subject: patient.reference(),
            effective_date_time: format!(
                "2024-{:02}-{:02}T{:02}:{:02}:00Z",
                1 + pick(0, 12),
                1 + pick(8, 28),
                6 + pick(16, 12),
                pick(24, 60)
            ),
            value_quantity: Quantity {
                value: tenths as f64 / 10.0,
                unit: "10*3/uL",
                system: "http://unitsofmeasure.org",
                code: "10*3/uL",
            },
        }
    }
}

impl Resource for Observation {
    const TYPE: &'static str = "Observation";

    fn id(&self) -> &str {
        &self.id
    }

    /// `code`: comma-separated tokens, any of which may match.
    fn matches(&self, name: &str, value: &str) -> Option<bool> {
        match name {
            "_id" => Some(matches_id(&self.id, value)),
            "code" => Some(
                value
                    .split(',')
                    .any(|token| self.code.coding.iter().any(|coding| coding.matches(token))),
            ),
            _ => None,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Group {
    resource_type: &'static str,
    id: String,
    #[serde(rename = "type")]
    kind: &'static str,
    actual: bool,
    name: &'static str,
    quantity: usize,
    member: Vec<GroupMember>,
}

#[derive(Serialize)]
struct GroupMember {
    entity: Reference,
}

impl Group {
    fn of_all(patients: &[Patient]) -> Self {
        Self {
            resource_type: Self::TYPE,
            id: "g-0001".to_owned(),
            kind: "person",
            actual: true,
            name: "Stand-in cohort",
            quantity: patients.len(),
            member: patients
                .iter()
                .map(|patient| GroupMember {
                    entity: patient.reference(),
                })
                .collect(),
        }
    }
}

impl Resource for Group {
    const TYPE: &'static str = "Group";

    fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataset_is_the_same_on_every_run() {
        let first = serde_json::to_string(&Dataset::generate(20).observations).unwrap();
        let second = serde_json::to_string(&Dataset::generate(20).observations).unwrap();
        assert_eq!(first, second);
    }

    #[test]
    fn each_patient_has_a_platelet_and_a_neutrophil_count() {
        let dataset = Dataset::generate(3);
        assert_eq!(dataset.patients.len(), 3);
        assert_eq!(dataset.observations.len(), 6);
        let observation = serde_json::to_value(&dataset.observations[3]).unwrap();
        assert_eq!(observation["id"], "o-0004");
        assert_eq!(observation["subject"]["reference"], "Patient/p-0002");
        assert_eq!(observation["code"]["coding"][0]["system"], LOINC);
        assert_eq!(observation["code"]["coding"][0]["code"], "751-8");
        let value = observation["valueQuantity"]["value"].as_f64().unwrap();
        assert!((1.5..=8.0).contains(&value), "{value}");
    }

    #[test]
    fn code_tokens_match_exactly() {
        let dataset = Dataset::generate(1);
        let platelets = &dataset.observations[0];
        let matches = |value| platelets.matches("code", value);
        assert_eq!(matches("http://loinc.org|777-3"), Some(true));
        assert_eq!(
            matches("http://loinc.org|751-8,http://loinc.org|777-3"),
            Some(true)
        );
        assert_eq!(matches("777-3"), Some(true));
        assert_eq!(matches("http://loinc.org|"), Some(true));
        assert_eq!(matches("http://loinc.org|777"), Some(false));
        assert_eq!(matches("|777-3"), Some(false));
        assert_eq!(matches("http://snomed.info/sct|777-3"), Some(false));
        assert_eq!(platelets.matches("status", "final"), None);
    }
}

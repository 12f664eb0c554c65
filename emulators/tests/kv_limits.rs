//! The KV emulator holds callers to Cloudflare's documented limits and envelope.

use ecom_emulators::kv::{codes, Fault, KvEmulator};
use serde_json::{json, Value};

const TOKEN: &str = "t";

async fn put(kv: &KvEmulator, body: Vec<u8>) -> (u16, Value) {
    let response = reqwest::Client::new()
        .put(format!(
            "{}/accounts/a/storage/kv/namespaces/ns/bulk",
            kv.base_url()
        ))
        .bearer_auth(TOKEN)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn pairs(n: usize, key_len: usize, value_len: usize) -> Vec<u8> {
    let pairs: Vec<Value> = (0..n)
        .map(|i| json!({"key": format!("{i:0>key_len$}"), "value": "v".repeat(value_len)}))
        .collect();
    serde_json::to_vec(&pairs).unwrap()
}

fn code(body: &Value) -> u64 {
    body["errors"][0]["code"].as_u64().unwrap()
}

#[tokio::test]
async fn a_valid_bulk_write_is_stored_and_answered_in_the_envelope() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    let (status, body) = put(&kv, pairs(3, 4, 2)).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["successful_key_count"], 3);
    assert_eq!(kv.value("a", "ns", "0002").as_deref(), Some("vv"));
}

#[tokio::test]
async fn base64_values_are_stored_decoded_and_bad_base64_is_refused() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    let body = json!([{"key": "k", "value": "eyJ4IjoxfQ==", "base64": true}]);
    assert_eq!(put(&kv, serde_json::to_vec(&body).unwrap()).await.0, 200);
    assert_eq!(kv.value("a", "ns", "k").as_deref(), Some(r#"{"x":1}"#));
    let bad = json!([{"key": "j", "value": "not base64!", "base64": true}]);
    let (status, answer) = put(&kv, serde_json::to_vec(&bad).unwrap()).await;
    assert_eq!((status, answer["success"].clone()), (400, json!(false)));
    assert_eq!(kv.value("a", "ns", "j"), None);
}

#[tokio::test]
async fn more_than_ten_thousand_pairs_are_refused() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    let (status, body) = put(&kv, pairs(10_001, 6, 1)).await;
    assert_eq!((status, code(&body)), (400, codes::TOO_MANY_ITEMS as u64));
    assert!(
        kv.keys("a", "ns").is_empty(),
        "nothing of a refused request is stored"
    );
    assert_eq!(put(&kv, pairs(10_000, 6, 1)).await.0, 200);
}

#[tokio::test]
async fn bad_keys_and_large_values_are_refused() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    let (status, body) = put(&kv, pairs(1, 513, 1)).await;
    assert_eq!((status, code(&body)), (400, codes::KEY_TOO_LONG as u64));
    for key in [".", "..", ""] {
        let body = serde_json::to_vec(&json!([{"key": key, "value": "v"}])).unwrap();
        assert_eq!(put(&kv, body).await.0, 400, "{key:?}");
    }
    let (status, body) = put(&kv, pairs(1, 3, 25 * 1024 * 1024 + 1)).await;
    assert_eq!((status, code(&body)), (413, codes::VALUE_TOO_LARGE as u64));
    assert_eq!(put(&kv, pairs(1, 512, 25 * 1024 * 1024)).await.0, 200);
}

#[tokio::test]
async fn bodies_of_one_hundred_megabytes_are_refused() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    let (status, body) = put(&kv, pairs(5, 3, 20 * 1024 * 1024)).await;
    assert_eq!((status, code(&body)), (413, codes::BODY_TOO_LARGE as u64));
}

#[tokio::test]
async fn requests_without_a_known_token_are_refused() {
    let kv = KvEmulator::start(0, &["other"]).await.unwrap();
    let (status, body) = put(&kv, pairs(1, 1, 1)).await;
    assert_eq!((status, code(&body)), (401, codes::AUTHENTICATION as u64));
    assert_eq!(body["success"], false);
}

#[tokio::test]
async fn missing_keys_read_as_404_with_code_10009() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    let response = reqwest::Client::new()
        .get(format!(
            "{}/accounts/a/storage/kv/namespaces/ns/values/a%2Fb",
            kv.base_url()
        ))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(code(&body), 10009);
}

#[tokio::test]
async fn injected_faults_apply_to_the_next_requests_only() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    kv.inject(
        Fault::Status {
            retry_after_raw: None,
            location: None,
            status: 503,
            retry_after: Some(7),
            retry_after_date: None,
            retry_after_ms: None,
        },
        1,
    );
    kv.inject(Fault::UnsuccessfulKeys { count: 1 }, 1);
    let (status, body) = put(&kv, pairs(2, 1, 1)).await;
    assert_eq!((status, body["success"].clone()), (503, json!(false)));
    let (status, body) = put(&kv, pairs(2, 1, 1)).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["unsuccessful_keys"], json!(["0"]));
    assert_eq!(kv.keys("a", "ns"), ["1"]);
    assert_eq!(put(&kv, pairs(2, 1, 1)).await.0, 200);
    assert_eq!(kv.keys("a", "ns"), ["0", "1"]);
}

#[tokio::test]
async fn key_lists_filter_by_prefix_and_page_with_a_cursor() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    for i in 0..25 {
        kv.insert("a", "ns", &format!("p-{i:02}"), "v");
    }
    kv.insert("a", "ns", "other", "v");
    let client = reqwest::Client::new();
    let mut names = Vec::new();
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let body: Value = client
            .get(format!(
                "{}/accounts/a/storage/kv/namespaces/ns/keys",
                kv.base_url()
            ))
            .query(&[
                ("prefix", "p-"),
                ("limit", "10"),
                ("cursor", cursor.as_str()),
            ])
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        names.extend(
            body["result"]
                .as_array()
                .unwrap()
                .iter()
                .map(|k| k["name"].as_str().unwrap().to_owned()),
        );
        cursor = body["result_info"]["cursor"].as_str().unwrap().to_owned();
        if cursor.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names.len(), 25);
    assert!(names.iter().all(|n| n.starts_with("p-")));
}

async fn bulk_get(kv: &KvEmulator, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!(
            "{}/accounts/a/storage/kv/namespaces/ns/bulk/get",
            kv.base_url()
        ))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn bulk_get_reads_up_to_a_hundred_keys_with_null_for_absent_ones() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    kv.insert("a", "ns", "k1", r#"{"x":1}"#);

    let (status, body) = bulk_get(&kv, json!({"keys": ["k1", "k2"]})).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["result"]["values"],
        json!({"k1": "{\"x\":1}", "k2": null})
    );

    let (_, parsed) = bulk_get(
        &kv,
        json!({"keys": ["k1"], "type": "json", "withMetadata": true}),
    )
    .await;
    assert_eq!(parsed["result"]["values"]["k1"]["value"], json!({"x": 1}));

    let many: Vec<String> = (0..101).map(|i| format!("k{i}")).collect();
    let (status, body) = bulk_get(&kv, json!({ "keys": many })).await;
    assert_eq!((status, code(&body)), (400, codes::BAD_REQUEST as u64));
    let (status, _) = bulk_get(&kv, json!({"keys": ["k1"], "extra": 1})).await;
    assert_eq!(
        status, 400,
        "unknown fields are refused, as the schema says"
    );
}

#[tokio::test]
async fn foreign_unsuccessful_keys_name_keys_the_request_never_held() {
    let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    kv.inject(Fault::ForeignUnsuccessfulKeys { count: 1 }, 1);
    let (status, body) = put(&kv, pairs(2, 2, 1)).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["successful_key_count"], 2);
    assert_eq!(body["result"]["unsuccessful_keys"], json!(["never-sent-0"]));
    assert_eq!(kv.keys("a", "ns").len(), 2);
}

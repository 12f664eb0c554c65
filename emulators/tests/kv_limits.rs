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

/// An emulator with the one namespace these tests use, `ns`.
async fn emulator(tokens: &[&str]) -> KvEmulator {
    let kv = KvEmulator::start(0, tokens).await.unwrap();
    kv.create_namespace("ns");
    kv
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
    let kv = emulator(&[TOKEN]).await;
    let (status, body) = put(&kv, pairs(3, 4, 2)).await;
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert_eq!(body["result"]["successful_key_count"], 3);
    assert_eq!(kv.value("a", "ns", "0002").as_deref(), Some("vv"));
}

#[tokio::test]
async fn base64_values_are_stored_decoded_and_bad_base64_is_refused() {
    let kv = emulator(&[TOKEN]).await;
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
    let kv = emulator(&[TOKEN]).await;
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
    let kv = emulator(&[TOKEN]).await;
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
    let kv = emulator(&[TOKEN]).await;
    let (status, body) = put(&kv, pairs(5, 3, 20 * 1024 * 1024)).await;
    assert_eq!((status, code(&body)), (413, codes::BODY_TOO_LARGE as u64));
}

#[tokio::test]
async fn requests_without_a_known_token_are_refused() {
    let kv = emulator(&["other"]).await;
    let (status, body) = put(&kv, pairs(1, 1, 1)).await;
    assert_eq!((status, code(&body)), (401, codes::AUTHENTICATION as u64));
    assert_eq!(body["success"], false);
}

#[tokio::test]
async fn missing_keys_read_as_404_with_code_10009() {
    let kv = emulator(&[TOKEN]).await;
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
    let kv = emulator(&[TOKEN]).await;
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
    let kv = emulator(&[TOKEN]).await;
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
async fn bulk_get_reads_up_to_a_hundred_keys_leaving_absent_ones_out() {
    let kv = emulator(&[TOKEN]).await;
    kv.insert("a", "ns", "k1", r#"{"x":1}"#);

    // The schema's values are strings, numbers, booleans or objects, never null.
    let (status, body) = bulk_get(&kv, json!({"keys": ["k1", "k2"]})).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["values"], json!({"k1": "{\"x\":1}"}));

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
    let kv = emulator(&[TOKEN]).await;
    kv.inject(Fault::ForeignUnsuccessfulKeys { count: 1 }, 1);
    let (status, body) = put(&kv, pairs(2, 2, 1)).await;
    assert_eq!(status, 200);
    assert_eq!(body["result"]["successful_key_count"], 2);
    assert_eq!(body["result"]["unsuccessful_keys"], json!(["never-sent-0"]));
    assert_eq!(kv.keys("a", "ns").len(), 2);
}

#[tokio::test]
async fn the_documented_fault_curl_works_as_written_and_says_what_it_set() {
    let kv = emulator(&[TOKEN]).await;
    let url = format!("http://{}/__emulator/faults", kv.addr());
    // `curl -d` sends `application/x-www-form-urlencoded`.
    let form = "application/x-www-form-urlencoded";
    let answer = reqwest::Client::new()
        .post(&url)
        .header("content-type", form)
        .body(r#"{"kind": "status", "status": 503, "times": 2}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let set: Value = answer.json().await.unwrap();
    assert_eq!(set["set"]["status"], 503);
    assert_eq!(set["set"]["times"], 2);
    for expected in [503, 503, 200] {
        assert_eq!(put(&kv, pairs(1, 1, 1)).await.0, expected);
    }
    let refused = reqwest::Client::new()
        .post(&url)
        .header("content-type", form)
        .body(r#"{"kind": "sttaus"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 400);
    let error: Value = refused.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().starts_with("no fault set"));
    let never = reqwest::Client::new()
        .post(&url)
        .body(r#"{"kind": "delay", "millis": 1, "times": 0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(never.status().as_u16(), 400);
    assert_eq!(put(&kv, pairs(1, 1, 1)).await.0, 200, "still serving");
}

#[tokio::test]
async fn keys_with_whitespace_or_unprintable_characters_are_refused_as_cloudflare_does() {
    let kv = emulator(&[TOKEN]).await;
    for key in ["a b", "a\tb", "a\u{0}b", "a\u{a0}b"] {
        let body = serde_json::to_vec(&json!([{"key": key, "value": "v"}])).unwrap();
        let (status, body) = put(&kv, body).await;
        assert_eq!(status, 400, "{key:?}: {body}");
    }
}

/// Cloudflare's published schema of the KV endpoints: the part of Cloudflare's OpenAPI schema
/// (api-schemas, BSD-3-Clause) that covers one namespace, copied unedited beside this test so
/// the repository checks itself anywhere.
const SCHEMA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/kv-openapi.json");

fn schema() -> Value {
    serde_json::from_str(&std::fs::read_to_string(SCHEMA).expect(SCHEMA)).unwrap()
}

/// The copy is the schema the project was given (`shared/cloudflare/` beside the repository,
/// where there is one): byte for byte.
#[test]
fn the_schema_copy_is_the_one_given() {
    let given = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/cloudflare/kv-openapi.json"
    );
    match std::fs::read(given) {
        Ok(given) => assert!(
            given == std::fs::read(SCHEMA).unwrap(),
            "{SCHEMA} differs from {given:?}"
        ),
        Err(e) => eprintln!("no {given} here ({e}): the copy is not compared"),
    }
}

async fn call(
    kv: &KvEmulator,
    method: reqwest::Method,
    tail: &str,
    body: Option<Value>,
) -> reqwest::Response {
    let url = format!("{}/accounts/a/storage/kv/namespaces/{tail}", kv.base_url());
    let mut request = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(TOKEN);
    if let Some(body) = body {
        request = request.json(&body);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn an_unknown_namespace_answers_404_in_the_envelope() {
    let kv = emulator(&[TOKEN]).await;
    let answer = call(&kv, reqwest::Method::GET, "other/keys", None).await;
    assert_eq!(answer.status().as_u16(), 404);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        (body["success"].as_bool(), code(&body)),
        (Some(false), 10013)
    );
}

#[tokio::test]
async fn values_are_read_back_as_octets_and_bulk_gets_follow_the_schema() {
    let kv = emulator(&[TOKEN]).await;
    let pairs = json!([{"key": "k", "value": "{\"a\":1}", "metadata": {"m": 1}}]);
    assert_eq!(put(&kv, serde_json::to_vec(&pairs).unwrap()).await.0, 200);
    let raw = call(&kv, reqwest::Method::GET, "ns/values/k", None).await;
    assert_eq!(raw.headers()["content-type"], "application/octet-stream");
    assert_eq!(raw.text().await.unwrap(), "{\"a\":1}");

    // The schema's plain values are never null: a missing key is left out.
    let schemas = &schema()["components"]["schemas"];
    let plain = &schemas["workers-kv_bulk-get-result"]["properties"]["values"];
    assert!(plain["additionalProperties"].get("nullable").is_none());
    let keys = json!({"keys": ["k", "missing"], "type": "text"});
    let answer = call(&kv, reqwest::Method::POST, "ns/bulk/get", Some(keys)).await;
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["result"]["values"], json!({"k": "{\"a\":1}"}));
    // With metadata each entry is nullable, and `expiration` is a number when present.
    let with_meta = &schemas["workers-kv_bulk-get-result-with-metadata"]["properties"]["values"];
    assert_eq!(with_meta["additionalProperties"]["nullable"], true);
    let keys = json!({"keys": ["k", "missing"], "withMetadata": true});
    let answer = call(&kv, reqwest::Method::POST, "ns/bulk/get", Some(keys)).await;
    let body: Value = answer.json().await.unwrap();
    assert_eq!(
        body["result"]["values"],
        json!({"k": {"value": "{\"a\":1}", "metadata": {"m": 1}}, "missing": null})
    );

    let meta = call(&kv, reqwest::Method::GET, "ns/metadata/k", None).await;
    assert_eq!(
        meta.json::<Value>().await.unwrap()["result"],
        json!({"m": 1})
    );
    let gone = call(&kv, reqwest::Method::GET, "ns/metadata/missing", None).await;
    assert_eq!(gone.status().as_u16(), 404);
}

#[tokio::test]
async fn expirations_are_checked_and_shown() {
    let kv = emulator(&[TOKEN]).await;
    let short = json!([{"key": "k", "value": "v", "expiration_ttl": 30}]);
    let (status, body) = put(&kv, serde_json::to_vec(&short).unwrap()).await;
    assert_eq!((status, code(&body)), (400, 10016), "{body}");
    let past = json!([{"key": "k", "value": "v", "expiration": 1000}]);
    assert_eq!(put(&kv, serde_json::to_vec(&past).unwrap()).await.0, 400);
    let fine = json!([{"key": "k", "value": "v", "expiration_ttl": 120}]);
    assert_eq!(put(&kv, serde_json::to_vec(&fine).unwrap()).await.0, 200);
    let listed: Value = call(&kv, reqwest::Method::GET, "ns/keys", None)
        .await
        .json()
        .await
        .unwrap();
    assert!(listed["result"][0]["expiration"].as_u64().unwrap() > 1_700_000_000);
}

#[tokio::test]
async fn cursors_are_opaque_and_only_handed_out_ones_are_taken() {
    let kv = emulator(&[TOKEN]).await;
    assert_eq!(put(&kv, pairs(15, 3, 1)).await.0, 200);
    let first: Value = call(&kv, reqwest::Method::GET, "ns/keys?limit=10", None)
        .await
        .json()
        .await
        .unwrap();
    let cursor = first["result_info"]["cursor"].as_str().unwrap().to_owned();
    assert!(!cursor.is_empty() && cursor != "009", "opaque: {cursor}");
    let next: Value = call(
        &kv,
        reqwest::Method::GET,
        &format!("ns/keys?limit=10&cursor={cursor}"),
        None,
    )
    .await
    .json()
    .await
    .unwrap();
    assert_eq!(next["result"].as_array().unwrap().len(), 5);
    let forged = call(&kv, reqwest::Method::GET, "ns/keys?cursor=009", None).await;
    assert_eq!(forged.status().as_u16(), 400);
}

#[tokio::test]
async fn endpoints_not_emulated_refuse_in_the_envelope() {
    let kv = emulator(&[TOKEN]).await;
    for (method, tail) in [
        (reqwest::Method::PUT, "ns/values/k"),
        (reqwest::Method::DELETE, "ns/values/k"),
        (reqwest::Method::DELETE, "ns/bulk"),
    ] {
        let answer = call(&kv, method.clone(), tail, None).await;
        assert_eq!(answer.status().as_u16(), 501, "{method} {tail}");
        let body: Value = answer.json().await.unwrap();
        assert_eq!(body["success"], false, "{method} {tail}");
    }
}

#[tokio::test]
async fn faults_left_can_be_listed_and_cleared_so_none_outlive_an_experiment() {
    let kv = emulator(&[TOKEN]).await;
    let url = format!("http://{}/__emulator/faults", kv.addr());
    let client = reqwest::Client::new();
    let answer = |request: reqwest::RequestBuilder| async {
        let response = request.send().await.unwrap();
        response.json::<Value>().await.unwrap()
    };
    let set = r#"{"kind": "status", "status": 503, "times": 10}"#;
    answer(client.post(&url).body(set)).await;
    let latency = r#"{"kind": "latency", "operation": "keys", "millis": 100}"#;
    answer(client.post(&url).body(latency)).await;
    // One request uses one of the ten.
    let (status, _) = put(&kv, pairs(1, 3, 3)).await;
    assert_eq!(status, 503);

    let left = answer(client.get(&url)).await;
    assert_eq!(left["queued"][0]["times"], 9, "{left}");
    assert_eq!(left["latencies"]["keys"], 100, "{left}");
    let cleared = answer(client.delete(&url)).await;
    assert_eq!(cleared["cleared"], 2, "{cleared}");

    let (status, _) = put(&kv, pairs(1, 3, 3)).await;
    assert_eq!(status, 200, "no fault left");
    let left = answer(client.get(&url)).await;
    assert_eq!(left["queued"], json!([]), "{left}");
}

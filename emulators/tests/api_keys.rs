//! The API-keys stand-in answers keys, 404s and scripted failures.

use ecom_emulators::api_keys::ApiKeysStandIn;

async fn status(keys: &ApiKeysStandIn, account: &str) -> u16 {
    let url =
        keys.url_template().replace("{cell}", "default") + &format!("/accounts/{account}/api-key");
    reqwest::get(url).await.unwrap().status().as_u16()
}

#[tokio::test]
async fn scripted_failures_end_after_their_count() {
    let keys = ApiKeysStandIn::start(0).await.unwrap();
    keys.set_key("a", "k");
    keys.fail_next("a", 503, 2);
    assert_eq!(status(&keys, "a").await, 503);
    assert_eq!(status(&keys, "a").await, 503);
    assert_eq!(status(&keys, "a").await, 200);
    assert_eq!(status(&keys, "nobody").await, 404);
    assert_eq!(keys.calls().len(), 4);
}

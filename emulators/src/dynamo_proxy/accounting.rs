//! What a call costs and touches, read from its request and answer: the tables it names, the
//! partitions it writes, its capacity units as DynamoDB would charge them, and whether it names a
//! key DynamoDB would refuse.

use serde_json::Value;

/// Whether the request names a key DynamoDB refuses: a partition key (`pk`) over 2,048 bytes or
/// a sort key (`sk`) over 1,024 (moto does not check), in a key, an item, a batch's keys and
/// items, or a Query's `:pk`.
pub(super) fn oversized_key(request: &Value) -> bool {
    let too_long = |key: &Value| {
        let length = |name: &str| key[name]["S"].as_str().map_or(0, str::len);
        length("pk") > 2048 || length("sk") > 1024
    };
    let batch = request["RequestItems"]
        .as_object()
        .into_iter()
        .flat_map(|t| t.values());
    let batch_keys = batch.flat_map(|table| {
        let gets = table["Keys"].as_array().into_iter().flatten();
        let writes = table
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| [&r["PutRequest"]["Item"], &r["DeleteRequest"]["Key"]]);
        gets.chain(writes)
    });
    let query_pk = request["ExpressionAttributeValues"][":pk"]["S"].as_str();
    let transact_keys = transact_actions(request).map(|(_, key)| key);
    [&request["Key"], &request["Item"]]
        .into_iter()
        .chain(batch_keys)
        .chain(transact_keys)
        .any(too_long)
        || query_pk.is_some_and(|pk| pk.len() > 2048)
}

/// Each action of a TransactWriteItems: what it writes (a Put's item, another's key), and
/// whether it is a Put.
pub(super) fn transact_actions(request: &Value) -> impl Iterator<Item = (bool, &Value)> {
    let items = request["TransactItems"].as_array().into_iter().flatten();
    let actions = items.filter_map(|item| item.as_object()?.iter().next());
    actions.map(|(kind, action)| match kind.as_str() {
        "Put" => (true, &action["Item"]),
        _ => (false, &action["Key"]),
    })
}

pub(super) fn tables_of(request: &Value) -> Vec<String> {
    if let Some(name) = request["TableName"].as_str() {
        return vec![name.to_owned()];
    }
    if let Some(items) = request["RequestItems"].as_object() {
        return items.keys().cloned().collect();
    }
    let transact = request["TransactItems"].as_array().into_iter().flatten();
    let mut names: Vec<String> = transact
        .filter_map(|item| item.as_object()?.values().next()?["TableName"].as_str())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

pub(super) fn partitions_written(operation: &str, request: &Value) -> Vec<String> {
    let pk = |item: &Value| item["pk"]["S"].as_str().map(str::to_owned);
    match operation {
        "PutItem" => pk(&request["Item"]).into_iter().collect(),
        "UpdateItem" | "DeleteItem" => pk(&request["Key"]).into_iter().collect(),
        "BatchWriteItem" => {
            let requests = request["RequestItems"].as_object().into_iter();
            let each = requests.flat_map(|t| t.values()).flat_map(|r| r.as_array());
            let items = each.flatten().map(|r| match r.get("PutRequest") {
                Some(put) => &put["Item"],
                None => &r["DeleteRequest"]["Key"],
            });
            items.filter_map(pk).collect()
        }
        "TransactWriteItems" => transact_actions(request)
            .filter_map(|(_, item)| pk(item))
            .collect(),
        _ => Vec::new(),
    }
}

/// Read and write units as DynamoDB would charge them, from the items' sizes.
pub(super) fn units(operation: &str, request: &Value, response: &[u8]) -> (f64, f64) {
    let size = |item: &Value| item.to_string().len() as f64;
    let writes = |bytes: f64| (bytes / 1024.0).ceil().max(1.0);
    let reads = |bytes: f64, consistent: bool| {
        (bytes / 4096.0).ceil().max(1.0) * if consistent { 1.0 } else { 0.5 }
    };
    let consistent = request["ConsistentRead"].as_bool() == Some(true);
    let answer: Value = serde_json::from_slice(response).unwrap_or(Value::Null);
    match operation {
        "PutItem" => (0.0, writes(size(&request["Item"]))),
        "UpdateItem" | "DeleteItem" => (0.0, writes(size(&request["Key"]))),
        "BatchWriteItem" => {
            let requests = request["RequestItems"].as_object().into_iter();
            let each = requests.flat_map(|t| t.values()).flat_map(|r| r.as_array());
            let units = each.flatten().map(|r| match r.get("PutRequest") {
                Some(put) => writes(size(&put["Item"])),
                None => 1.0,
            });
            (0.0, units.sum())
        }
        // A transaction's write costs twice a plain one's.
        "TransactWriteItems" => {
            let units = transact_actions(request).map(|(_, item)| 2.0 * writes(size(item)));
            (0.0, units.sum())
        }
        "GetItem" => (reads(size(&answer["Item"]), consistent), 0.0),
        "BatchGetItem" => {
            let consistent = |table: &str| {
                request["RequestItems"][table]["ConsistentRead"].as_bool() == Some(true)
            };
            let responses = answer["Responses"].as_object().into_iter().flatten();
            let units = responses.flat_map(|(table, items)| {
                let items = items.as_array().into_iter().flatten();
                items.map(move |item| reads(size(item), consistent(table)))
            });
            (units.sum(), 0.0)
        }
        "Query" | "Scan" => {
            let items = answer["Items"].as_array().into_iter().flatten();
            (reads(items.map(size).sum(), consistent), 0.0)
        }
        _ => (0.0, 0.0),
    }
}

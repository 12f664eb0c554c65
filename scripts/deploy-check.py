"""The template, deployed: `template.yaml` translated by aws-sam-translator (what `sam deploy`
sends to CloudFormation), checked where moto cannot check it, created as a stack in moto's
CloudFormation, and the function run as the stack configures it.

1. Translate (offline, as `sam deploy` does; CodeUri points at an artifact in moto's S3).
2. Check the translated JSON for what moto drops or cannot run: the ledger without a TTL, point
   in time recovery and encryption; the function's JSON logs in its own group; the stream's event
   source mapping (partial-batch responses, bisect, the failed-records queue, the `live` alias);
   the schedule's input (`events/scheduled-reconcile.json`); the rollout (CodeDeploy moves `live`,
   rolled back on alarms that watch the new version alone, each able to fire within the judging
   time of every deployment type the template allows; none on rejected records), tracing and tags.
3. Create the settings table and its stream first (another stack owns them), then the stack,
   with the resource types moto 5.2.5 lacks taken out after step 2 checked them (the alias: the
   mapping then names the function; the alarms; the Logs query definitions; CodeDeploy's
   application and deployment group).
4. Read the function's configuration back from moto's Lambda (its environment as the stack set
   it), point only the outside world (Cloudflare, the API keys service) at the stand-ins, run the
   function binary behind the Invoke API and send it a stream event of the stack's table, then the
   schedule's input as moto's EventBridge rule holds it: the records land in KV and the ledger the
   stack created holds the pass.
5. Every alarm watches a metric as it is published: one the function emitted (EMF) in step 4 under
   the alarm's dimensions and the stack's function name, or Lambda's or SQS's own metric under the
   dimensions they publish it with.

Usage (moto on AWS_ENDPOINT_URL, e.g. under scripts/with-moto.sh):
  python scripts/deploy-check.py --function target/debug/ecom-settings-exporter \
      --emulators target/debug/ecom-emulators
Prints one line per check and `N passed, N failed`; exit 1 on a failure.
"""
import argparse
import contextlib
import copy
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile

import boto3
from cfnlint.decode import cfn_yaml
from samtranslator.translator.transform import transform

STACK = "deploy-check"
ENV = "ci"
SETTINGS_TABLE = "ci-EcomIndexSettingsTable"
SECRET = "ci/CloudFlareApiToken"
TOKEN = "deploy-check-token"
ARTIFACTS = "deploy-check-artifacts"
# Resource types moto 5.2.5's CloudFormation does not create: checked on the JSON, then left out.
NOT_IN_MOTO = {"AWS::Lambda::Alias", "AWS::CloudWatch::Alarm", "AWS::Logs::QueryDefinition",
               "AWS::CodeDeploy::Application", "AWS::CodeDeploy::DeploymentGroup"}
# Metrics the function emits (src/report.rs) and the AWS ones the alarms may watch.
OWN_NAMESPACE = "EcomSettingsExporter"


class Checks:
    def __init__(self):
        self.passed = self.failed = 0

    def check(self, ok, what, detail=""):
        if ok:
            self.passed += 1
            print(f"ok    {what}")
        else:
            self.failed += 1
            print(f"FAIL  {what}{': ' + detail if detail else ''}")
        return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def translate(template_path, parameters):
    with open(template_path) as f:
        template = cfn_yaml.loads(f.read())
    template = json.loads(json.dumps(template))  # plain dicts, as SAM reads JSON
    template["Resources"]["ExporterFunction"]["Properties"]["CodeUri"] = f"s3://{ARTIFACTS}/function.zip"

    class NoManagedPolicies:
        def load(self):
            return {}

    return transform(template, parameters, NoManagedPolicies())


def of_type(resources, kind):
    return {name: r for name, r in resources.items() if r["Type"] == kind}


def check_translated(checks, cfn):
    resources = cfn["Resources"]
    ledger = resources["LedgerTable"]["Properties"]
    checks.check("TimeToLiveSpecification" not in ledger, "ledger table: no TTL (nothing in it expires)")
    checks.check(ledger.get("PointInTimeRecoverySpecification", {}).get("PointInTimeRecoveryEnabled") is True,
                 "ledger table: point-in-time recovery")
    checks.check(ledger.get("SSESpecification", {}).get("SSEEnabled") is True, "ledger table: encrypted")
    checks.check(ledger.get("BillingMode") == "PAY_PER_REQUEST", "ledger table: on demand")

    function = resources["ExporterFunction"]["Properties"]
    logging = function.get("LoggingConfig", {})
    checks.check(logging.get("LogFormat") == "JSON" and logging.get("LogGroup") == {"Ref": "ExporterLogGroup"},
                 "function: JSON logs in its own log group", json.dumps(logging))
    env = function["Environment"]["Variables"]
    checks.check(env.get("LEDGER_TABLE_NAME") == {"Ref": "LedgerTable"}, "function: LEDGER_TABLE_NAME is the stack's ledger")

    aliases = of_type(resources, "AWS::Lambda::Alias")
    live = [name for name, a in aliases.items() if a["Properties"]["Name"] == "live"]
    checks.check(len(live) == 1, "function: a `live` alias on a published version")
    mappings = list(of_type(resources, "AWS::Lambda::EventSourceMapping").values())
    mapping = mappings[0]["Properties"] if len(mappings) == 1 else {}
    checks.check(len(mappings) == 1 and mapping.get("FunctionName") == {"Ref": live[0] if live else None},
                 "stream: one event source mapping, invoking the `live` alias")
    checks.check(mapping.get("FunctionResponseTypes") == ["ReportBatchItemFailures"]
                 and mapping.get("BisectBatchOnFunctionError") is True
                 and mapping.get("StartingPosition") == "TRIM_HORIZON",
                 "stream: partial-batch responses, bisect on error, from TRIM_HORIZON")
    destination = mapping.get("DestinationConfig", {}).get("OnFailure", {}).get("Destination")
    checks.check(destination == {"Fn::GetAtt": ["FailedRecordsQueue", "Arn"]},
                 "stream: records given up go to the failed-records queue", json.dumps(destination))

    check_rollout(checks, resources, live[0] if live else None, judged_types(cfn.get("Parameters", {})))

    rules = list(of_type(resources, "AWS::Events::Rule").values())
    with open("events/scheduled-reconcile.json") as f:
        expected_input = json.load(f)
    targets = [t for r in rules for t in r["Properties"].get("Targets", [])]
    inputs = [json.loads(t["Input"]) for t in targets if "Input" in t]
    checks.check(inputs == [expected_input], "schedule: its input is events/scheduled-reconcile.json", json.dumps(inputs))
    target_arns = [t.get("Arn") for t in targets]
    checks.check(target_arns == [{"Ref": live[0] if live else None}], "schedule: invokes the `live` alias",
                 json.dumps(target_arns))

    return live[0] if live else None


# How long CodeDeploy judges a new version before it has all the traffic, per deployment type, in
# seconds: a canary's one interval; a linear shift's nine steps until the last tenth moves.
# AllAtOnce judges nothing. An alarm's evaluation must fit it with the metrics' delay on top
# (EMF and Lambda's metrics reach CloudWatch a minute or two late).
METRIC_DELAY = 120
JUDGED_SECONDS = {"Canary10Percent5Minutes": 300, "Canary10Percent10Minutes": 600,
                  "Canary10Percent30Minutes": 1800, "Linear10PercentEvery1Minute": 540,
                  "Linear10PercentEvery3Minutes": 1620}


def rollback_alarm_problems(resources, alias, deployment_types):
    """Why the alarms CodeDeploy rolls back on would not judge the new version alone, in time, under
    each of `deployment_types`: [] when they do. Alone: each alarm's dimensions name the version the
    alias moves to (ExecutedVersion), so the old version's failures neither roll it back nor hide
    its own. In time: an alarm's evaluation (Period x EvaluationPeriods) and the metrics' delay fit
    the judging time."""
    problems = []
    new_version = resources.get(alias, {}).get("Properties", {}).get("FunctionVersion")
    groups = of_type(resources, "AWS::CodeDeploy::DeploymentGroup")
    group = next(iter(groups.values()), {}).get("Properties", {})
    names = [a["Name"] for a in group.get("AlarmConfiguration", {}).get("Alarms", [])]
    shortest = min(((JUDGED_SECONDS.get(t, 0), t) for t in deployment_types), default=(0, "no deployment type"))
    for t in deployment_types:
        if t not in JUDGED_SECONDS:
            problems.append(f"deployment type {t}: its judging time is not known to deploy-check")
    for name in names:
        alarm = resources.get(name.get("Ref") if isinstance(name, dict) else None)
        if alarm is None or alarm["Type"] != "AWS::CloudWatch::Alarm":
            problems.append(f"{json.dumps(name)} is not an alarm of the template")
            continue
        props = alarm["Properties"]
        dimensions = {d["Name"]: d["Value"] for d in props.get("Dimensions", [])}
        if new_version is None or dimensions.get("ExecutedVersion") != new_version:
            problems.append(f"{name['Ref']} counts every version (no ExecutedVersion of the alias's new version)")
        evaluated = props.get("Period", 0) * props.get("EvaluationPeriods", 0)
        if not 0 < evaluated + METRIC_DELAY <= shortest[0]:
            problems.append(f"{name['Ref']} takes {evaluated} s and the metrics' {METRIC_DELAY} s to fire, "
                            f"{shortest[1]} judges for {shortest[0]} s")
        if props.get("MetricName") == "RecordsRejected":
            problems.append(f"{name['Ref']} watches rejected records: a bad item would roll back a healthy version")
        if props.get("Metrics") or props.get("ExtendedStatistic"):
            problems.append(f"{name['Ref']}: a metric-math or percentile alarm deploy-check cannot judge")
    return problems


def judged_types(parameters):
    """Every deployment type the template allows that judges a new version (AllAtOnce does not)."""
    allowed = parameters.get("DeploymentType", {}).get("AllowedValues", [])
    return [t for t in allowed if t != "AllAtOnce"]


def check_rollout(checks, resources, live, deployment_types):
    """CodeDeploy moves `live` to a new version, rolled back on alarms that judge it alone, in time."""
    function = resources["ExporterFunction"]["Properties"]
    checks.check(function.get("TracingConfig") == {"Mode": "Active"}, "function: X-Ray tracing active")
    tags = {t["Key"] for t in function.get("Tags", [])}
    checks.check({"service", "environment"} <= tags, "function: tagged service and environment", str(tags))
    alias = resources.get(live, {})
    update = alias.get("UpdatePolicy", {}).get("CodeDeployLambdaAliasUpdate", {})
    groups = of_type(resources, "AWS::CodeDeploy::DeploymentGroup")
    checks.check(len(groups) == 1 and update.get("DeploymentGroupName") == {"Ref": next(iter(groups), None)},
                 "rollout: CodeDeploy moves the `live` alias", json.dumps(update))
    group = next(iter(groups.values()), {}).get("Properties", {})
    alarms = [a["Name"] for a in group.get("AlarmConfiguration", {}).get("Alarms", [])]
    checks.check(group.get("AlarmConfiguration", {}).get("Enabled") is True and alarms,
                 "rollout: watched by alarms", json.dumps(alarms))
    problems = rollback_alarm_problems(resources, live, deployment_types)
    checks.check(not problems, "rollout: every rollback alarm judges the new version alone, within the "
                 f"judging time of each deployment type ({', '.join(deployment_types)})", "; ".join(problems))
    rollback = group.get("AutoRollbackConfiguration", {})
    checks.check(rollback.get("Enabled") is True and "DEPLOYMENT_STOP_ON_ALARM" in rollback.get("Events", []),
                 "rollout: rolled back when an alarm fires", json.dumps(rollback))
    config = json.dumps(group.get("DeploymentConfigName"))
    checks.check("Canary10Percent5Minutes" in config, "rollout: a canary by default", config)


# The AWS metrics an alarm may watch, with the dimensions each is published under, and what each
# dimension must name in the template.
# (Lambda adds ExecutedVersion, the version that ran, to invocations of an alias.)
FUNCTION = {"FunctionName": {"Ref": "ExporterFunction"}}
ALIAS = {**FUNCTION, "Resource": {"Fn::Sub": "${ExporterFunction}:live"}}
AWS_METRICS = {
    ("AWS/Lambda", "Errors"): [ALIAS, {**ALIAS, "ExecutedVersion": "new version"}],
    ("AWS/Lambda", "IteratorAge"): [FUNCTION],
    ("AWS/SQS", "ApproximateNumberOfMessagesVisible"): [
        {"QueueName": {"Fn::GetAtt": ["FailedRecordsQueue", "QueueName"]}}],
}


def check_alarms(checks, resources, emitted, function_name, new_version):
    """Each alarm watches a metric that is published, under the dimensions it is published with:
    Lambda's and SQS's own (AWS_METRICS), or one the function emitted (EMF) in this run. An
    ExecutedVersion must name the version the alias moves to."""
    for name, alarm in of_type(resources, "AWS::CloudWatch::Alarm").items():
        props = alarm["Properties"]
        namespace, metric = props["Namespace"], props["MetricName"]
        dimensions = {d["Name"]: d["Value"] for d in props.get("Dimensions", [])}
        if dimensions.get("ExecutedVersion") == new_version:
            dimensions["ExecutedVersion"] = "new version"
        if namespace == OWN_NAMESPACE:
            published = emitted.get(metric, set())
            ok = dimensions in (FUNCTION, {**FUNCTION, "ExecutedVersion": "new version"}) and \
                (tuple(dimensions), function_name) in published
            detail = f"emitted under {sorted(published)}" if published else "never emitted in this run"
        else:
            ok = dimensions in AWS_METRICS.get((namespace, metric), [])
            detail = json.dumps(dimensions)
        checks.check(ok, f"alarm {name}: watches {namespace}/{metric} as it is published", detail)


def without_what_moto_lacks(cfn, alias):
    """The template moto can create: where the alias is named, the function's ARN is."""
    cfn = copy.deepcopy(cfn)
    cfn["Resources"] = {n: r for n, r in cfn["Resources"].items() if r["Type"] not in NOT_IN_MOTO}

    def swap(node):
        if isinstance(node, dict):
            if node == {"Ref": alias}:
                return {"Fn::GetAtt": ["ExporterFunction", "Arn"]}
            return {k: swap(v) for k, v in node.items() if not (k == "DependsOn" and v == alias)}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    return swap(cfn)


def settings_table(ddb):
    ddb.create_table(
        TableName=SETTINGS_TABLE, BillingMode="PAY_PER_REQUEST",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                              {"AttributeName": "sk", "AttributeType": "S"}],
        StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
    return ddb.describe_table(TableName=SETTINGS_TABLE)["Table"]["LatestStreamArn"]


def create_stack(cfn, parameters):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=ARTIFACTS, CreateBucketConfiguration={"LocationConstraint": os.environ["AWS_REGION"]})
    artifact = io.BytesIO()
    with zipfile.ZipFile(artifact, "w") as z:
        # moto keeps the code, never runs it: the function binary itself runs below.
        z.writestr("bootstrap", "#!/bin/sh\n")
    s3.put_object(Bucket=ARTIFACTS, Key="function.zip", Body=artifact.getvalue())
    cloudformation = boto3.client("cloudformation")
    cloudformation.create_stack(
        StackName=STACK, TemplateBody=json.dumps(cfn), Capabilities=["CAPABILITY_IAM"],
        Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()])
    for _ in range(100):
        stack = cloudformation.describe_stacks(StackName=STACK)["Stacks"][0]
        if not stack["StackStatus"].endswith("IN_PROGRESS"):
            break
        time.sleep(0.1)
    resources = cloudformation.describe_stack_resources(StackName=STACK)["StackResources"]
    return stack, {r["LogicalResourceId"]: r for r in resources}


def wait_for_url(url, process):
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answers at {url}")


def post(url, payload):
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=150) as answer:
        return answer.headers.get("X-Amz-Function-Error"), json.loads(answer.read() or b"null")


def run_as_configured(checks, args, function_name, configured, stream_arn, ledger_table, schedule_input):
    """The function binary with the environment moto's Lambda holds, the outside world stood in."""
    kv_port, keys_port, invoke_port = free_port(), free_port(), free_port()
    env = dict(configured)
    env["CLOUDFLARE_API_BASE_URL"] = f"http://127.0.0.1:{kv_port}/client/v4"
    env["API_KEYS_SERVICE_URL"] = f"http://127.0.0.1:{keys_port}/cells/{{cell}}"
    env["AWS_LAMBDA_FUNCTION_NAME"] = function_name  # as Lambda sets them
    env["AWS_LAMBDA_FUNCTION_VERSION"] = "1"
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
        env[name] = os.environ[name]
    processes = []
    try:
        kv = subprocess.Popen([args.emulators, "kv", "--port", str(kv_port), "--token", TOKEN,
                               "--namespace", configured["CLOUDFLARE_KV_NAMESPACE_ID"],
                               "--namespace", configured["CLOUDFLARE_QCFG_NAMESPACE_ID"]],
                              stdout=subprocess.DEVNULL)
        processes.append(kv)
        keys = subprocess.Popen([args.emulators, "api-keys", "--port", str(keys_port), "--key", "*=deploy-check-key"],
                                stdout=subprocess.DEVNULL)
        processes.append(keys)
        with tempfile.NamedTemporaryFile("w", suffix=".env", delete=False) as env_file:
            env_file.write("".join(f"{k}={v}\n" for k, v in env.items()))
        log_path = os.path.join(tempfile.gettempdir(), "deploy-check-function.log")
        log = open(log_path, "w")
        invoke = subprocess.Popen([args.emulators, "invoke", "--port", str(invoke_port), "--function", args.function,
                                   "--env-file", env_file.name, "--timeout", str(args.timeout)],
                                  stdout=log, stderr=subprocess.STDOUT)
        processes.append(invoke)
        wait_for_url(f"http://127.0.0.1:{kv_port}/__emulator/namespaces", kv)
        wait_for_url(f"http://127.0.0.1:{invoke_port}/", invoke)
        url = f"http://127.0.0.1:{invoke_port}/2015-03-31/functions/{function_name}/invocations"

        # The migration before the stream runs (`make migrate`, here without a mapping to pause):
        # the stack's table is empty, so the backfill marks the ledger's references complete.
        error, answer = post(url, {"mode": "backfill"})
        checks.check(error is None and isinstance(answer, dict) and answer.get("complete") is True,
                     "migrated: a full backfill marked the ledger's references complete", json.dumps(answer)[:300])
        with open("events/stream-insert.json") as f:
            event = json.load(f)
        for record in event["Records"]:
            record["eventSourceARN"] = stream_arn
            # As the stream stamps it: a moment ago (the sample's date is past the stream's 24 h).
            record["dynamodb"]["ApproximateCreationDateTime"] = round(time.time() - 1.0, 3)
        # The function exports each record's item as the table holds it: the item first.
        boto3.client("dynamodb").put_item(TableName=SETTINGS_TABLE, Item=event["Records"][0]["dynamodb"]["NewImage"])
        error, answer = post(url, event)
        checks.check(error is None and answer == {"batchItemFailures": []},
                     "invoked with a stream event of the stack's table: every record exported", json.dumps(answer))
        image = event["Records"][0]["dynamodb"]["NewImage"]
        shop, index_id = image["shop_id"]["S"], f"{image['pk']['S']}-{image['sk']['S'].removeprefix('INDEX#')}"
        namespace = f"{configured['CLOUDFLARE_ACCOUNT_ID']}/{configured['CLOUDFLARE_KV_NAMESPACE_ID']}"
        held = json.load(urllib.request.urlopen(f"http://127.0.0.1:{kv_port}/__emulator/namespaces"))
        value = json.loads(held.get(namespace, {}).get(shop, "null"))
        checks.check(isinstance(value, dict) and value.get("index_id") == index_id,
                     f"KV namespace `{namespace}`: the shop key `{shop}` holds `{index_id}`", json.dumps(held)[:300])

        error, answer = post(url, schedule_input)
        checks.check(error is None and isinstance(answer, dict) and answer.get("scheduled") is True
                     and answer.get("ran") is True,
                     "invoked with the schedule's input: a scheduled reconcile ran", json.dumps(answer)[:300])
        ddb = boto3.client("dynamodb")
        progress = ddb.get_item(TableName=ledger_table, Key={"pk": {"S": "reconcile"}, "sk": {"S": "progress"}},
                                ConsistentRead=True).get("Item")
        checks.check(progress is not None, f"the stack's ledger table `{ledger_table}` holds the reconcile's pass")
        return log_path
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def emitted_metrics(log_path):
    """{metric: {(dimension names, FunctionName)}} of the EMF documents the function logged."""
    emitted = {}
    with open(log_path, errors="replace") as log:
        for line in log:
            start = line.find("{")
            try:
                document = json.loads(line[start:]) if start >= 0 else None
            except ValueError:
                continue
            if not isinstance(document, dict) or "_aws" not in document:
                continue
            for directive in document["_aws"].get("CloudWatchMetrics", []):
                if directive.get("Namespace") != OWN_NAMESPACE:
                    continue
                for dimensions in directive.get("Dimensions", []):
                    for metric in directive.get("Metrics", []):
                        emitted.setdefault(metric["Name"], set()).add(
                            (tuple(dimensions), document.get("FunctionName")))
    return emitted


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--function", required=True)
    parser.add_argument("--emulators", required=True)
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args()
    for binary in (args.function, args.emulators):
        if not os.access(binary, os.X_OK):
            print(f"deploy-check: {binary} is not built: run `make bins` (make test builds it too)")
            return 1
    checks = Checks()
    print(f"function binary: {os.path.realpath(args.function)}")
    # boto3 (and so the translator) reads the region from AWS_DEFAULT_REGION.
    os.environ.setdefault("AWS_DEFAULT_REGION", os.environ["AWS_REGION"])

    stream_arn = settings_table(boto3.client("dynamodb"))
    boto3.client("secretsmanager").create_secret(Name=SECRET, SecretString=TOKEN)
    parameters = {
        "Environment": ENV,
        "SettingsTableName": SETTINGS_TABLE,
        "SettingsTableStreamArn": stream_arn,
        "CloudflareAccountId": "deploy-check-account",
        "CloudflareKvNamespaceId": "settings",
        "CloudflareQcfgNamespaceId": "qcfg",
        "CloudflareApiTokenSecretId": SECRET,
        "ApiKeysServiceUrl": "https://api-keys.invalid/cells/{cell}",
    }
    started = time.monotonic()
    cfn = translate("template.yaml", parameters)
    checks.check("Transform" not in cfn, f"template.yaml translated ({time.monotonic() - started:.1f} s)")
    alias = check_translated(checks, cfn)

    stack, resources = create_stack(without_what_moto_lacks(cfn, alias), parameters)
    checks.check(stack["StackStatus"] == "CREATE_COMPLETE", f"stack created in moto ({len(resources)} resources)",
                 stack.get("StackStatusReason", stack["StackStatus"]))
    if stack["StackStatus"] != "CREATE_COMPLETE":
        return finish(checks)

    function_name = resources["ExporterFunction"]["PhysicalResourceId"]
    configuration = boto3.client("lambda").get_function_configuration(FunctionName=function_name)
    configured = configuration["Environment"]["Variables"]
    ledger_table = resources["LedgerTable"]["PhysicalResourceId"]
    checks.check(configured.get("LEDGER_TABLE_NAME") == ledger_table == f"{ENV}-EcomSettingsExporterLedger",
                 f"function `{function_name}`: its ledger is the table the stack made", json.dumps(configured)[:300])
    keys = boto3.client("dynamodb").describe_table(TableName=ledger_table)["Table"]["KeySchema"]
    checks.check(sorted((k["AttributeName"], k["KeyType"]) for k in keys) == [("pk", "HASH"), ("sk", "RANGE")],
                 "ledger table: pk / sk")
    mappings = boto3.client("lambda").list_event_source_mappings()["EventSourceMappings"]
    checks.check([(m["EventSourceArn"], m["FunctionArn"]) for m in mappings] == [(stream_arn, configuration["FunctionArn"])],
                 "event source mapping from the table's stream to the function", json.dumps(mappings, default=str)[:400])
    events = boto3.client("events")
    rule = next(r for r in resources.values() if r["ResourceType"] == "AWS::Events::Rule")["PhysicalResourceId"]
    target = events.list_targets_by_rule(Rule=rule)["Targets"][0]
    log = run_as_configured(checks, args, function_name, configured, stream_arn, ledger_table,
                            json.loads(target["Input"]))
    new_version = cfn["Resources"][alias]["Properties"]["FunctionVersion"] if alias else None
    check_alarms(checks, cfn["Resources"], emitted_metrics(log), function_name, new_version)
    check_pause(checks, cfn)
    return finish(checks)


def check_pause(checks, cfn):
    """`scripts/pause.py` pauses what the stack made (its mapping, its schedule, the alarms a
    pause sets off; the alarms put into moto's CloudWatch as the template defines them) and
    resumes it."""
    spec = importlib.util.spec_from_file_location("pause", os.path.join(os.path.dirname(__file__), "pause.py"))
    pause = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pause)
    cloudwatch = boto3.client("cloudwatch")
    for name in pause.SILENCED:
        props = cfn["Resources"][f"{name}Alarm"]["Properties"]
        cloudwatch.put_metric_alarm(
            AlarmName=f"{ENV}-EcomSettingsExporter-{name}", Namespace=props["Namespace"],
            MetricName=props["MetricName"], Statistic=props["Statistic"], Period=props["Period"],
            EvaluationPeriods=props["EvaluationPeriods"], Threshold=1.0,
            ComparisonOperator=props["ComparisonOperator"], ActionsEnabled=True)
    exporter = pause.Exporter(ENV)
    with contextlib.redirect_stdout(io.StringIO()):
        pause.main(["pause", "--env", ENV])
    mappings, rule, alarms = exporter.status()
    checks.check(len(mappings) == 1 and set(mappings.values()) == {"Disabled"} and rule == "DISABLED"
                 and len(alarms) == 3 and not any(alarms.values()),
                 "pause: the stream's mapping and the schedule disabled, three alarms' actions off",
                 f"{mappings} {rule} {alarms}")
    with contextlib.redirect_stdout(io.StringIO()):
        code = pause.main(["resume", "--env", ENV, "--quiet", "0"])
    mappings, rule, alarms = exporter.status()
    checks.check(code == 0 and set(mappings.values()) == {"Enabled"} and rule == "ENABLED" and all(alarms.values()),
                 "resume: enabled again, the alarms' actions on once the stream is quiet",
                 f"{code} {mappings} {rule} {alarms}")


def finish(checks):
    print(f"deploy-check: {checks.passed} passed, {checks.failed} failed")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())

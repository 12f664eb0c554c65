"""deploy-check.py's rollout check fails where it should: the template as it is passes, and each
way a rollback alarm can misjudge a deployment, made on a copy of the translated template, fails
with a reason naming the alarm.

Run: .venv/bin/python -m unittest scripts/test_deploy_check.py  (make test runs it)
"""
import copy
import importlib.util
import os
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("deploy_check", os.path.join(HERE, "deploy-check.py"))
deploy_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(deploy_check)

PARAMETERS = {
    "SettingsTableName": "t",
    "SettingsTableStreamArn": "arn:aws:dynamodb:eu-west-1:1:table/t/stream/s",
    "CloudflareAccountId": "a", "CloudflareKvNamespaceId": "k", "CloudflareQcfgNamespaceId": "q",
    "ApiKeysServiceUrl": "https://api-keys.example/{cell}",
}


class RollbackAlarms(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        os.environ.setdefault("AWS_DEFAULT_REGION", "eu-west-1")
        cwd = os.getcwd()
        os.chdir(os.path.join(HERE, ".."))
        try:
            cls.cfn = deploy_check.translate("template.yaml", PARAMETERS)
        finally:
            os.chdir(cwd)
        cls.types = deploy_check.judged_types(cls.cfn["Parameters"])

    def problems(self, change=None):
        resources = copy.deepcopy(self.cfn["Resources"])
        if change:
            change(resources)
        return deploy_check.rollback_alarm_problems(resources, "ExporterFunctionAliaslive", self.types)

    def watched(self, resources):
        group = deploy_check.of_type(resources, "AWS::CodeDeploy::DeploymentGroup")
        return next(iter(group.values()))["Properties"]["AlarmConfiguration"]["Alarms"]

    def test_the_template_judges_the_new_version_alone_in_time(self):
        self.assertIn("Canary10Percent5Minutes", self.types)
        self.assertNotIn("AllAtOnce", self.types)
        self.assertEqual(self.problems(), [])

    def test_an_alarm_over_every_version_fails(self):
        def watch_paging_alarm(resources):
            self.watched(resources).append({"Name": {"Ref": "FunctionErrorsAlarm"}})
        problems = self.problems(watch_paging_alarm)
        self.assertIn("FunctionErrorsAlarm counts every version (no ExecutedVersion of the alias's new version)",
                      problems)

    def test_an_alarm_slower_than_the_shortest_canary_fails(self):
        def slow(resources):
            resources["CanaryRecordsFailingAlarm"]["Properties"].update(Period=300, EvaluationPeriods=3)
        problems = self.problems(slow)
        self.assertEqual(problems, ["CanaryRecordsFailingAlarm takes 900 s and the metrics' 120 s to fire, "
                                    "Canary10Percent5Minutes judges for 300 s"])

    def test_an_alarm_on_rejected_records_fails(self):
        def rejected(resources):
            props = resources["CanaryRecordsFailingAlarm"]["Properties"]
            props["MetricName"] = "RecordsRejected"
        problems = self.problems(rejected)
        self.assertEqual(len(problems), 1, problems)
        self.assertIn("rejected records", problems[0])

    def test_a_deployment_type_deploy_check_does_not_know_fails(self):
        problems = deploy_check.rollback_alarm_problems(
            self.cfn["Resources"], "ExporterFunctionAliaslive", self.types + ["Canary10Percent1Minute"])
        self.assertIn("deployment type Canary10Percent1Minute: its judging time is not known to deploy-check",
                      problems)



spec = importlib.util.spec_from_file_location("release", os.path.join(HERE, "release.py"))
release = importlib.util.module_from_spec(spec)
spec.loader.exec_module(release)


class Release(unittest.TestCase):
    def test_the_deploy_names_the_crate_version_and_the_commit(self):
        import re
        import subprocess
        with open(os.path.join(HERE, "..", "Cargo.toml")) as f:
            version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
        commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        self.assertRegex(release.release(), rf"^{re.escape(version)}\+{commit}(\.dirty)?$")

    def test_the_overrides_keep_samconfigs_and_add_the_release(self):
        for env in ("dev", "prod"):
            overrides = release.overrides(env)
            self.assertEqual(overrides[0], f"Environment={env}")
            self.assertTrue(any(o.startswith("ApiKeysServiceUrl=") for o in overrides), overrides)
            self.assertEqual([o for o in overrides if o.startswith("Release=")],
                             [f"Release={release.release()}"])


spec = importlib.util.spec_from_file_location("pause", os.path.join(HERE, "pause.py"))
pause = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pause)


class Resume(unittest.TestCase):
    """`pause.py resume` turns the alarms back on only once the stream has caught up."""

    class Stub:
        def __init__(self, states, ages):
            self.states, self.ages = states, ages

        def list_event_source_mappings(self, **_):
            return {"EventSourceMappings": [{"UUID": "u", "State": s, "FunctionArn":
                    "arn:aws:lambda:r:1:function:dev-EcomSettingsExporterLambda:live"} for s in self.states]}

        def get_function_configuration(self, **_):
            return {"Environment": {"Variables": {"SETTINGS_TABLE_STREAM_ARN": "s"}}}

        def describe_alarms(self, **_):
            return {"MetricAlarms": [{"Threshold": 300_000}]}

        def get_metric_statistics(self, **_):
            import datetime
            start = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
            return {"Datapoints": [{"Timestamp": start + datetime.timedelta(minutes=i), "Maximum": age}
                                   for i, age in enumerate(self.ages)]}

    def caught_up(self, states, ages, waited, quiet=300):
        import datetime
        exporter = pause.Exporter.__new__(pause.Exporter)
        exporter.function, exporter.alarms = "dev-EcomSettingsExporterLambda", ["dev-x"]
        exporter.aws_lambda = exporter.cloudwatch = self.Stub(states, ages)
        since = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=waited)
        return exporter.caught_up(since, quiet)

    def test_not_before_the_mapping_is_enabled(self):
        self.assertFalse(self.caught_up(["Enabling"], [], waited=3600))

    def test_not_while_the_backlog_drains_or_before_three_minutes_reported(self):
        self.assertFalse(self.caught_up(["Enabled"], [900_000, 400_000, 1_000], waited=600))
        self.assertFalse(self.caught_up(["Enabled"], [1_000, 2_000], waited=600))
        self.assertFalse(self.caught_up(["Enabled"], [], waited=120))

    def test_once_the_age_stayed_under_the_threshold_or_the_stream_was_quiet(self):
        self.assertTrue(self.caught_up(["Enabled"], [900_000, 200, 100, 50, 10, 5], waited=600))
        self.assertTrue(self.caught_up(["Enabled"], [], waited=301))


if __name__ == "__main__":
    unittest.main()

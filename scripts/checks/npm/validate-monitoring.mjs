// Validates prometheus-operator objects (ServiceMonitor, PodMonitor, PrometheusRule) with the
// validators @kubernetes-models/prometheus-operator generates from prometheus-operator's Go
// API types. Reads a JSON array of objects on stdin; prints a JSON array of
// {index, kind, name, error}; exits 0 either way (the caller decides).
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";

const MODELS = { ServiceMonitor, PodMonitor, PrometheusRule };

let input = "";
process.stdin.setEncoding("utf8");
for await (const chunk of process.stdin) input += chunk;

const results = JSON.parse(input).map((obj, index) => {
  const name = obj?.metadata?.name ?? "";
  const Model = obj?.apiVersion === "monitoring.coreos.com/v1" ? MODELS[obj.kind] : undefined;
  if (!Model) return { index, kind: obj?.kind, name, error: `no validator for ${obj?.apiVersion} ${obj?.kind}` };
  try {
    new Model(obj).validate();
    return { index, kind: obj.kind, name, error: null };
  } catch (e) {
    return { index, kind: obj.kind, name, error: String(e.message ?? e) };
  }
});
process.stdout.write(JSON.stringify(results));

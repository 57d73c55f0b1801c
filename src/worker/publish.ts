import type { Sidecar } from '../broker/sidecar.js';
import type { ResultPayload } from '../job/report.js';
import type { StoredRequest } from './claim.js';
import type { WorkerInput } from './slot.js';

// A result message, to the results topic and (MQTT 5) the request's response topic, on the sidecar connection.

/**
 * Publishes a result (to the results topic, and to the request's MQTT 5 response topic with its correlation
 * data) on the sidecar and waits for the broker to accept it: true when it did. Never on the job connection: once
 * its delivery is acknowledged, a broker may send the next request before the result's PUBACK (Aedes does), and
 * MQTT.js reads nothing behind a request held for the slot's next run.
 */
export async function publishResult(
  via: Sidecar,
  input: WorkerInput,
  result: ResultPayload,
  response: Omit<StoredRequest, 'request'>,
  { responseOnly = false } = {},
): Promise<boolean> {
  const body = JSON.stringify(result);
  const sent = responseOnly ? [] : [via.publish(`${input.options.resultsTopic}/${result.id}`, body)];
  if (response.responseTopic) {
    const correlationData = response.correlationData
      ? Buffer.from(response.correlationData, 'base64')
      : undefined;
    sent.push(via.publish(response.responseTopic, body, correlationData ? { correlationData } : undefined));
  }
  const codes = await Promise.all(sent.map((p) => p.catch(() => -1)));
  if (codes.some((code) => code >= 0x80 || code < 0)) {
    input.log.warn(
      `the broker did not accept the result of ${result.id} (codes ${codes.join(', ')}); result.json holds it`,
    );
  }
  // What counts is the results topic: a response topic the broker refuses must not keep the job from settling.
  const main = codes[0] ?? -1;
  return responseOnly || (main >= 0 && main < 0x80);
}

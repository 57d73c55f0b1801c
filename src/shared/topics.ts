// MQTT topic facts the worker relies on in several places: shared subscriptions and filter matching.

const SHARED = /^\$share\/[^/]+\//;

/** Is this subscription a shared one (`$share/group/…`)? */
export function isShared(subscription: string): boolean {
  return SHARED.test(subscription);
}

/** `$share/group/jobs/pending` → `jobs/pending`: the topic requests are published to. */
export function plainTopic(subscription: string): string {
  return subscription.replace(SHARED, '');
}

/** Does an MQTT topic filter match a topic? */
export function topicMatches(filter: string, topic: string): boolean {
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length || (f[i] !== '+' && f[i] !== t[i])) return false;
  }
  return f.length === t.length;
}

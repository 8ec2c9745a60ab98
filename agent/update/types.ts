import type { UpdateState, UpdateEvent } from './machine.ts';

/**
 * What the updater needs from a verified bundle (bundles/index.ts VerifiedBundle satisfies
 * it structurally). agent/ does not import bundles/ (layout rule): the verifier is passed
 * in by whoever starts the agent (cli/commands/agent.ts, tests).
 */
export interface BundleManifestLike {
  name: string;
  kind: string;
  version: string;
  sequence: number;
  app?: { command: string; args?: readonly string[]; env?: Readonly<Record<string, string>>; health?: unknown } | undefined;
}
export interface VerifiedBundleLike {
  manifest: BundleManifestLike;
  sha256: string;
  size: number;
  extractTo(dir: string): Promise<void>;
}
/** Verifies a bundle file against the device's trust root and targets; `floor` = the persisted sequence floor of the name. */
export type VerifyBundleFn = (file: string, opts: { floor?: number; kind?: 'app' | 'agent' }) => Promise<VerifiedBundleLike>;

export type UpdateSource = 'hub' | 'upload' | 'watch';

/** The persisted record of one update (<stateDir>/update/state.json). Field names are a contract. */
export interface UpdateRecord {
  v: 1;
  id: string;
  state: UpdateState;
  source: UpdateSource;
  /** the bundle file on the device (downloads/<sha>.bundle or incoming/<id>.bundle) */
  file: string;
  url?: string;
  /** expected or measured sha256 of the whole bundle file */
  sha256?: string;
  size?: number;
  /** the name the source asked for (hub desired key); the manifest must match it */
  wantName?: string;
  wantKind?: 'app' | 'agent';
  kind?: string;
  name?: string;
  version?: string;
  sequence?: number;
  /** release dir name of the new version (<version>-s<sequence>) */
  release?: string;
  /** release dir name that ran before (null: nothing was installed) */
  previous?: string | null;
  previousVersion?: string | null;
  /** the chain of states; `resumed` marks an agent start that found the update in that state */
  history: Array<{ state: UpdateState; at: number; event?: UpdateEvent; resumed?: true; reason?: string }>;
  /** agent starts that found this update in progress (loop guard) */
  resumes: number;
  reason?: string;
  code?: string;
  startedAt: number;
  updatedAt: number;
  /** agent self-update: starts of the new binary so far and when the switch happened */
  boots?: number;
  switchedAt?: number;
  /** rollback timing: decision taken, old version running again (ms since epoch) */
  rollbackDecidedAt?: number;
  rollbackDoneAt?: number;
  /** the final event went to the outbox */
  reported: boolean;
}

/** What a release dir holds beside the bundle's files (.fleetlet-release.json). */
export interface ReleaseMeta {
  name: string;
  kind: string;
  version: string;
  sequence: number;
  sha256: string;
  app?: BundleManifestLike['app'];
  stagedAt: number;
  /** where the bundle came from; an app the hub's desired state installed is removed when it leaves that state */
  source?: UpdateSource;
}

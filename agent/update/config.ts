import { z } from 'zod';

/** The updater's keys (docs/config.md#update, docs/ota.md). Paths default under the state dir. */
export const UpdateConfigSchema = z
  .object({
    /** trust root the bundles must verify against; default <stateDir>/trust/root.json */
    trustRoot: z.string().optional(),
    /** this device's class, matched against a bundle's targets.deviceClass */
    deviceClass: z.string().min(1).max(64).optional(),
    /** a directory watched for bundle files (a USB stick mount); the newest valid one is applied */
    watchDir: z.string().optional(),
    /** how often watchDir is scanned, ms */
    watchIntervalMs: z.number().int().min(100).max(3_600_000).default(5000),
    /** how long a new app release must stay up and healthy before it is committed, ms */
    probationMs: z.number().int().min(0).max(86_400_000).default(60_000),
    /** optional check run in the release dir at the end of probation; non-zero exit rolls back */
    checkCommand: z.array(z.string()).min(1).optional(),
    /** time limit of the check command, ms */
    checkTimeoutMs: z.number().int().min(100).max(600_000).default(30_000),
    /** agent starts that may find one update in progress before it is abandoned (loop guard) */
    maxResumes: z.number().int().min(1).max(1000).default(5),
    /** lock file that holds an app's update off; `{app}` is replaced; default <stateDir>/apps/{app}/update.lock */
    lockFile: z.string().optional(),
    /** how often a held lock is checked, ms */
    lockPollMs: z.number().int().min(50).max(600_000).default(1000),
    /** largest bundle accepted (download, upload, watched dir), bytes */
    maxBundleBytes: z.number().int().min(1024).default(2 * 1024 ** 3),
    /** bytes that must stay free after a download */
    reserveBytes: z.number().int().min(0).default(64 * 1024 ** 2),
    /** download attempts (each resumes with Range) before the update fails */
    downloadAttempts: z.number().int().min(1).max(1000).default(12),
    downloadBackoffMs: z.number().int().min(1).default(1000),
    downloadBackoffMaxMs: z.number().int().min(1).default(60_000),
    downloadIdleTimeoutMs: z.number().int().min(100).default(30_000),
    /** base for bundle URLs in the desired state that are paths (e.g. http://hub:8080) */
    artifactBaseUrl: z.string().optional(),
    /** agent self-update: starts of a new agent binary that may pass without it becoming healthy and connected */
    agentMaxStarts: z.number().int().min(1).max(100).default(3),
    /** agent self-update: seconds a new agent binary has to become healthy and connected */
    agentHealthyWithinS: z.number().int().min(1).max(86_400).default(300),
    /** finished updates kept for GET /api/v1/updates */
    historyLimit: z.number().int().min(1).max(1000).default(20),
  })
  .strict();
export type UpdateConfig = z.infer<typeof UpdateConfigSchema>;

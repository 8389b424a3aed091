// Errors every layer may throw. The command line prints a UserError as one line with exit
// code 1 (src/cli/main.ts); the readers in src/data throw it where the fix is the user's.

/** A mistake in the command line or the files it names: printed as one line, exit code 1. */
export class UserError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'UserError';
  }
}

/** What kind of value an array argument was, for messages: "Float32Array", "a plain array", "null", "undefined". */
export function arrayKind(value: unknown): string {
  if (ArrayBuffer.isView(value)) return (value as object).constructor.name;
  if (Array.isArray(value)) return 'a plain array';
  return value === null ? 'null' : typeof value;
}

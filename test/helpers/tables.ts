// Markdown tables from src/eval/report.ts's markdownTable are padded into columns; tests
// that match a table's figures with a pattern read it with the padding taken out.

/** `text` with each table cell's padding removed: "| a    | 1 |" -> "| a | 1 |", "| ---- |" -> "| --- |". */
export function unpadded(text: string): string {
  return text
    .split('\n')
    .map((line) => (line.startsWith('|') ? line.replace(/ +\|/g, ' |').replace(/(?<=\| )-{3,}(?= \|)/g, '---') : line))
    .join('\n');
}

"""The caption page `dalipipe serve` sends: one HTML file, no external resources.

A person drops or picks a sound or video file, or records one with the microphone
(MediaRecorder), picks the modality and reads the caption; for an image modality the frame the
captioner saw is shown under it. The page posts the file to /caption and shows the JSON answer.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dalipipe: describe a sound</title>
<style>
 body { font-family: sans-serif; max-width: 44em; margin: 2em auto; padding: 0 1em; }
 #drop { border: 2px dashed #888; padding: 2em; text-align: center; border-radius: 8px; }
 #drop.over { background: #eef; }
 #caption { font-size: 1.4em; margin: 1em 0 0.3em; min-height: 1.4em; }
 #error { color: #a00; }
 #how, #model { color: #555; }
 #frame { max-width: 100%; margin-top: 1em; }
</style>
</head>
<body>
<h1>Describe a sound</h1>
<p id="model">Model: {model}. Files up to {max_mb} MB.</p>
<form id="form">
 <div id="drop">
  <p>Drop an audio or video file here, or choose one:</p>
  <input type="file" id="file" name="file" accept="audio/*,video/*">
  <p><button type="button" id="record">Record from the microphone</button></p>
 </div>
 <p>
  <label for="modality">Modality</label>
  <select id="modality" name="modality">
   <option value="audio" selected>audio</option>
   <option value="audio+image">audio+image</option>
   <option value="image">image</option>
  </select>
  <button type="submit" id="submit">Caption</button>
 </p>
</form>
<p id="status" role="status"></p>
<p id="caption"></p>
<p id="how"></p>
<p id="error"></p>
<img id="frame" alt="the frame the captioner saw" hidden>
<script>
const form = document.getElementById("form"), input = document.getElementById("file");
const drop = document.getElementById("drop"), recordButton = document.getElementById("record");
const show = (id, text) => { document.getElementById(id).textContent = text || ""; };
let recorded = null, recorder = null;

drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) { input.files = e.dataTransfer.files; recorded = null; }
});
input.addEventListener("change", () => { recorded = null; });

recordButton.addEventListener("click", async () => {
  if (recorder && recorder.state === "recording") { recorder.stop(); return; }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({audio: true}); }
  catch (err) { show("error", "The microphone is not available: " + err.message); return; }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = e => chunks.push(e.data);
  recorder.onstop = () => {
    stream.getTracks().forEach(t => t.stop());
    recorded = new File(chunks, "recording.webm", {type: recorder.mimeType});
    recordButton.textContent = "Record from the microphone";
    show("status", "Recorded " + (recorded.size / 1024).toFixed(0) + " kB; press Caption.");
  };
  recorder.start();
  recordButton.textContent = "Stop recording";
  show("status", "Recording...");
});

form.addEventListener("submit", async e => {
  e.preventDefault();
  const file = recorded || input.files[0];
  if (!file) { show("error", "Choose, drop or record a file first."); return; }
  const body = new FormData();
  body.append("file", file, file.name);
  body.append("modality", document.getElementById("modality").value);
  ["caption", "how", "error"].forEach(id => show(id, ""));
  document.getElementById("frame").hidden = true;
  show("status", "Captioning " + file.name + "...");
  let answer;
  try {
    const response = await fetch("caption", {method: "POST", body: body});
    answer = await response.json();
  } catch (err) { show("status", ""); show("error", "No answer from the server: " + err); return; }
  show("status", "");
  if (answer.error) { show("error", answer.file ? answer.file + ": " + answer.error : answer.error); return; }
  show("caption", answer.caption);
  show("how", answer.file + ", " + answer.modality + ", " + answer.decoding);
  if (answer.frame) {
    const frame = document.getElementById("frame");
    frame.src = answer.frame; frame.hidden = false;
  }
  document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
});
</script>
</body>
</html>
"""

-- Argo CD health check for cloudpass.dev TrustProvider, CredentialProvider and
-- AccessPolicy. Healthy once the operator has observed the current generation and
-- reports Ready=True; Degraded on Ready=False (with the operator's reason and message);
-- Progressing until then.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the cloudpass operator to report status"
  return hs
end
local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the cloudpass operator to observe generation " .. tostring(generation)
  return hs
end
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then
    if condition.status == "True" then
      hs.status = "Healthy"
    elseif condition.status == "False" then
      hs.status = "Degraded"
    else
      hs.status = "Progressing"
    end
    hs.message = (condition.reason or "") .. ": " .. (condition.message or "")
    return hs
  end
end
hs.status = "Progressing"
hs.message = "No Ready condition yet"
return hs
